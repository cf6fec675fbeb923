"""Every sample of a users' data set checked before training starts.

``check_sample`` runs the whole encoding path of ``training/data.py`` except the pixel work: the
sample's layout (``samples.to_conversation``), each image decoded with Pillow, each video opened and
sampled with PyAV exactly as training will sample it, ``<image>`` / ``<video>`` markers against the
media, empty or missing answers, and the token count after image / video expansion (tile layouts and
frame timestamps, no pixel tensors). With a length limit a long sample is truncated by
``training.data.truncation``'s rule -- cut the end of the text, never inside an image block -- and
dropped when the cut would cross an image or leave no answer token.

``validate`` runs it over a source with a progress bar, reports each dropped sample by name
(``<file>:<line>``, ``<file>#<row>``) with its reason, prints a summary (kept / dropped, counts per
reason) and returns the kept samples; nothing kept is an error. Nothing is cached: a run re-validates.
"""

from __future__ import annotations

import sys
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from smolvlm.data import samples as S
from smolvlm.data.cauldron import DataError
from smolvlm.data import sources
from smolvlm.data.sources import Mixture, eval_format, mixture_entries, open_source
from smolvlm.training import data as data_mod
from smolvlm.training.collate import IGNORE_INDEX
from smolvlm.training.recipe import Recipe, RecipeError
from smolvlm.training.data import (
    MediaOptions,
    align_by_utterance,
    conversation_labels,
    expanded_ids,
    truncation,
)

REMOTE = "remote file"
MAX_LISTED = 1000  # dropped samples named one by one; beyond that only counted


def _missing(src: Any) -> bool:
    return isinstance(src, (str, Path)) and not str(src).startswith(("data:",)) and not Path(src).expanduser().is_file()


def _remote(src: Any) -> bool:
    return isinstance(src, str) and src.startswith(("http://", "https://"))


def image_layout(src: Any, processor: Any, options: MediaOptions) -> Any:
    """Decode one image (Pillow) and return its tile layout; ``SampleError`` when missing or corrupt."""
    if _remote(src):
        raise S.SampleError(REMOTE, f"image {src} is a URL; download it and give its path")
    if _missing(src):
        raise S.SampleError(S.MISSING_FILE, f"image {src}")
    try:
        img = processor.image_processor.load(src)  # decodes every pixel (RGB conversion)
    except FileNotFoundError:
        raise S.SampleError(S.MISSING_FILE, f"image {src}") from None
    except Exception as e:  # noqa: BLE001 - whatever Pillow raises on a broken file
        what = src if isinstance(src, (str, Path)) else f"({type(src).__name__})"
        raise S.SampleError(S.CORRUPT_IMAGE, f"image {str(what)[:120]}: {str(e)[:160]}") from None
    return processor.image_processor.layout(img, options.image_splitting)


def video_frames(src: Any, processor: Any, options: MediaOptions) -> Any:
    """Open and sample one video (PyAV) as training will; ``SampleError`` when missing or corrupt."""
    if _remote(src):
        raise S.SampleError(REMOTE, f"video {src} is a URL; download it and give its path")
    if _missing(src):
        raise S.SampleError(S.MISSING_FILE, f"video {src}")
    try:
        return processor.load_video(src, fps=options.video_fps, max_frames=options.video_max_frames)
    except FileNotFoundError:
        raise S.SampleError(S.MISSING_FILE, f"video {src}") from None
    except Exception as e:  # noqa: BLE001 - whatever FFmpeg raises on a broken file
        raise S.SampleError(S.CORRUPT_VIDEO, f"video {str(src)[:120]}: {str(e)[:160]}") from None


def check_sample(sample: Any, processor: Any, *, system_prompt: str | None = None,
                 options: MediaOptions = MediaOptions(), max_length: int | None = None) -> tuple[int, int]:
    """``(tokens after expansion, tokens kept)`` of a trainable sample; ``SampleError`` otherwise."""
    conv = S.to_conversation(sample, system_prompt)
    layouts = [image_layout(src, processor, options) for src in conv.images]
    frames = [video_frames(src, processor, options) for src in conv.videos]
    try:
        text, u_ids, u_labels = conversation_labels(conv, processor)
        ids = expanded_ids(text, processor, layouts, frames)
        labels = align_by_utterance(u_ids, u_labels, ids, processor.end_of_utterance_token_id)
    except S.SampleError:
        raise
    except Exception as e:  # noqa: BLE001 - a template or tokenizer failure on this sample only
        raise S.SampleError(S.LAYOUT, f"cannot render the conversation: {str(e)[:200]}") from None
    if all(x == IGNORE_INDEX for x in labels):
        raise S.SampleError(S.NO_ASSISTANT, "no answer token to train on")
    keep, why = truncation(ids, labels, max_length, processor.image_token_id, processor.fake_image_token_id)
    if why:
        raise S.SampleError(S.TOO_LONG, why)
    return len(ids), keep


@dataclass
class Report:
    """What validation kept and dropped (``dropped``: ``(name, reason, detail)``)."""

    what: str
    total: int = 0
    kept: int = 0
    truncated: int = 0
    max_length: int | None = None
    dropped: list[tuple[str, str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason, _ in self.dropped).most_common())

    def summary(self) -> str:
        cut = f", {self.truncated} truncated to {self.max_length} tokens" if self.truncated else ""
        line = f"{self.what}: kept {self.kept} of {self.total} samples{cut}; dropped {len(self.dropped)}"
        reasons = ", ".join(f"{r} {n}" for r, n in self.counts().items())
        return line + (f" ({reasons})" if reasons else "")


class Validated(Sequence):
    """The kept samples of a source, in source order (``report`` says what was dropped)."""

    def __init__(self, source: Sequence, keep: Sequence[int], report: Report) -> None:
        self.source, self.keep, self.report = source, array("q", keep), report

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.source[self.keep[i]]


def validate(source: Sequence, processor: Any, *, what: str = "data", system_prompt: str | None = None,
             options: MediaOptions = MediaOptions(), max_length: int | None = None, progress: bool = True,
             out: TextIO | None = None) -> Validated:
    """Check every sample of ``source`` (progress bar on stderr); report and drop the bad ones."""
    from tqdm import tqdm

    out = out or sys.stderr
    report, keep = Report(what, len(source), max_length=max_length), []
    bar = tqdm(range(len(source)), desc=f"checking {what}", unit="sample", disable=not progress, file=sys.stderr,
               leave=False)
    for i in bar:
        sample = source[i]
        try:
            n, kept = check_sample(sample, processor, system_prompt=system_prompt, options=options,
                                   max_length=max_length)
        except S.SampleError as e:
            name = S.sample_name(sample, f"{what}[{i}]")
            report.dropped.append((name, e.reason, e.detail))
            if len(report.dropped) <= MAX_LISTED:
                tqdm.write(f"dropped {name}: {e.reason}: {e.detail}", file=out)
            continue
        keep.append(i)
        report.truncated += kept < n
    bar.close()
    report.kept = len(keep)
    if len(report.dropped) > MAX_LISTED:
        print(f"... and {len(report.dropped) - MAX_LISTED} more dropped samples", file=out)
    print(report.summary(), file=out)
    if not keep:
        reasons = ", ".join(f"{r} {n}" for r, n in report.counts().items()) or "it is empty"
        raise DataError(f"{what}: no usable sample, all {report.total} were dropped ({reasons}); "
                        f"see the lines above for each sample and its reason")
    return Validated(source, keep, report)


def prepare_data(data: Any, processor: Any, *, options: MediaOptions = MediaOptions(), max_length: int | None = None,
                 progress: bool = True, out: TextIO | None = None) -> tuple[Sequence, Sequence | None]:
    """A recipe's ``data`` section -> (validated training samples, validated eval samples or None).

    ``data.mixture`` (or ``format`` + ``path``) gives the training sources, each capped at
    ``data.limit`` and validated on its own; several are mixed by weight (``sources.Mixture``, seeded
    by ``data.seed``). ``data.eval_path`` is validated the same way."""
    kw = dict(system_prompt=data.system_prompt, options=options, max_length=max_length, progress=progress, out=out)
    entries = mixture_entries(data)
    parts = [validate(open_source(fmt, path, data.limit), processor, what=path, **kw) for fmt, path, _ in entries]
    train: Sequence = parts[0]
    if len(parts) > 1:
        train = Mixture(parts, [w for _, _, w in entries], seed=data.seed)
        shares = ", ".join(f"{p} {n}" for (_, p, _), n in zip(entries, train.counts))
        print(f"training mixture: {len(train)} samples ({shares})", file=out or sys.stderr)
    ev = None
    if data.eval_path:
        ev = validate(open_source(eval_format(data), data.eval_path, data.limit), processor,
                      what=data.eval_path, **kw)
    return train, ev


# -- the recipe's users' data ----------------------------------------------------------------------
def own_data(recipe: Recipe) -> bool:
    """Users' files (``data.format: cauldron | jsonl`` or ``data.mixture``) for SFT."""
    d = recipe.data
    return recipe.train.objective == "sft" and (d.format in sources.FORMATS or bool(d.mixture))


def check_data_paths(recipe: Recipe) -> None:
    """Users' data: ``data.path`` / ``eval_path`` / every mixture entry exists and holds files of its format."""
    if own_data(recipe):
        try:
            sources.check_paths(recipe.data)
        except sources.DataError as e:
            raise RecipeError(f"data: {e}") from None


def own_datasets(recipe: Recipe, processor: Any, model: Any) -> tuple[Any, Any]:
    """Users' data, every sample validated first (``prepare_data``: bad ones reported by name and
    dropped); samples longer than ``data.max_length`` (or the model's positions) truncated or dropped."""
    d = recipe.data
    limits = [x for x in (d.max_length, model.config.text_config.max_position_embeddings) if x]
    max_length = min(limits) if limits else None
    options = data_mod.MediaOptions(d.image_splitting, d.video_fps, d.video_max_frames)
    train, ev = prepare_data(d, processor, options=options, max_length=max_length,
                                           progress=recipe.train.progress)
    datasets = [data_mod.SFTDataset(s, processor, d.system_prompt, options, max_length, skip_bad=True)
                if s is not None else None for s in (train, ev)]
    return datasets[0], datasets[1]
