"""Evaluation: metrics (pure), tasks (benchmarks -> requests), runner (batched eval -> results JSON).

``evaluate(model, processor, EvalConfig(task="synth", n=200))`` returns the results dict that
``smolvlm eval`` writes; see ``runner.py``.
"""

from __future__ import annotations

from smolvlm.evaluation.metrics import aggregate, anls, exact_match, vqa_accuracy
from smolvlm.evaluation.runner import EvalConfig, evaluate

__all__ = ["EvalConfig", "aggregate", "anls", "evaluate", "exact_match", "vqa_accuracy"]
