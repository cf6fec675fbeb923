"""Scoring rules of the seeds' benchmarks (pure Python, no torch).

``SCORERS[name](prediction, reference) -> float`` in [0, 1]; ``METRIC_NAMES[name]`` is the metric as
reported; ``extract(name, prediction, reference)`` is what the scorer compared (normalised /
extracted answer; None when nothing could be extracted); ``extract_choice(prediction, options)`` is
the generic multiple-choice letter extractor (VK's ``can_infer``).

Policy: follow VLMEvalKit (VK, the SmolVLM authors' scorer) unless VK needs an LLM judge; then the
deterministic rule-based path. Each module's docstring names the reference files and where lmms-eval
(LE) and VK differ. Multiple choice with no extractable answer scores 0.

Every scorer sees ``prediction.strip()``: VK's SmolVLM wrapper returns ``generated_text.strip()``, so
VK's scorers never see surrounding whitespace (it matters for ANLS's raw-length denominator, ChartQA
percentages in LE, MLVU's exact letter test). ``None`` counts as an empty prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smolvlm.evaluation.scoring import anls as _anls
from smolvlm.evaluation.scoring import choice as _choice
from smolvlm.evaluation.scoring import mathvista as _mathvista
from smolvlm.evaluation.scoring import mmmu as _mmmu
from smolvlm.evaluation.scoring import ocrbench as _ocrbench
from smolvlm.evaluation.scoring import relaxed as _relaxed
from smolvlm.evaluation.scoring import video as _video
from smolvlm.evaluation.scoring import vqa as _vqa
from smolvlm.evaluation.scoring.choice import extract_choice

__all__ = ["EXTRACTORS", "METRIC_NAMES", "SCORERS", "extract", "extract_choice"]

_RULES: dict[str, tuple[Callable, Callable, str]] = {
    "docvqa": (_anls.score_docvqa, _anls.extract_docvqa, "anls"),
    "textvqa": (_vqa.score_textvqa, _vqa.extract_textvqa, "vqa_accuracy"),
    "chartqa": (_relaxed.score_chartqa, _relaxed.extract_chartqa, "relaxed_accuracy"),
    "ocrbench": (_ocrbench.score_ocrbench, _ocrbench.extract_ocrbench, "accuracy"),
    "ai2d": (_choice.score_choice, _choice.extract_mcq, "accuracy"),
    "scienceqa": (_choice.score_choice, _choice.extract_mcq, "accuracy"),
    "mmstar": (_choice.score_choice, _choice.extract_mcq, "accuracy"),
    "mmmu": (_mmmu.score_mmmu, _mmmu.extract_mmmu, "accuracy"),
    "mathvista": (_mathvista.score_mathvista, _mathvista.extract_mathvista, "accuracy"),
    "videomme": (_video.score_videomme, _video.extract_videomme, "accuracy"),
    "mvbench": (_video.score_mvbench, _video.extract_mvbench, "accuracy"),
    "mlvu": (_video.score_mlvu, _video.extract_mlvu, "accuracy"),
}


def _clean(prediction: Any) -> str:
    return "" if prediction is None else str(prediction).strip()


def _stripped(fn: Callable, name: str) -> Callable:
    def wrapper(prediction: Any, reference: dict) -> Any:
        return fn(_clean(prediction), reference)

    wrapper.__name__ = f"{fn.__name__}[{name}]"
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


SCORERS: dict[str, Callable[[str, dict], float]] = {n: _stripped(s, n) for n, (s, _, _) in _RULES.items()}
EXTRACTORS: dict[str, Callable[[str, dict], str | None]] = {n: _stripped(e, n) for n, (_, e, _) in _RULES.items()}
METRIC_NAMES: dict[str, str] = {n: m for n, (_, _, m) in _RULES.items()}


def extract(benchmark: str, prediction: str, reference: dict) -> str | None:
    """What ``SCORERS[benchmark]`` compared: the normalised / extracted answer, None if none."""
    return EXTRACTORS[benchmark](prediction, reference)
