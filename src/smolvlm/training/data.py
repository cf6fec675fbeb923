"""Datasets -> chat messages -> model inputs with assistant-only labels.

Samples follow the_cauldron layout (also what ``smolvlm.synth`` produces) or are chat messages with
images / videos anywhere in user turns; ``data/samples.py`` turns either into a conversation (a
the_cauldron sample through ``data/cauldron.py``: all images at the start of the first user turn,
SPEC 7). Labels
are -100 everywhere except the tokens of each assistant answer and its ``<end_of_utterance>``
(what the m4 SFT trains, SPEC 7 "Original m4 SFT"): system and user turns, the ``"Assistant:"``
prefix, the ``"\\n"`` after each utterance, image tokens and padding are masked.

How the spans are found, robustly: the chat template is rendered for each prefix of the
conversation, which gives the character span of every answer in the rendered text (between the
``"Assistant:"`` generation prompt and the end of its ``<end_of_utterance>``). The rendered text is
tokenized with offsets; a token is a target iff its start offset lies in a span. Those labels live on
the *unexpanded* text, where each ``<image>`` / ``<video>`` is one token; the processor then
expands them. ``align_by_utterance`` carries the labels over by ``<end_of_utterance>`` anchors: no
expansion holds an ``<end_of_utterance>``, so every answer segment (from the user's
``<end_of_utterance>`` through its own) is the same ids in both sequences, and is checked to be (an
error otherwise, never silent misalignment). This holds for videos too, whose expansion starts with
plain text that BPE may merge with the text before it.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from smolvlm import synth
from smolvlm.data.cauldron import DataError, Message
from smolvlm.data.samples import Conversation, sample_name, to_conversation
from smolvlm.training.collate import IGNORE_INDEX

EOU = "<end_of_utterance>"
IMAGE = "<image>"
VIDEO = "<video>"


def assistant_char_spans(render: Callable[..., str], messages: Sequence[Message], eou: str = EOU) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the ``[start, end)`` character span of every assistant answer,
    from the start of the answer (after ``"Assistant:"``) through its ``<end_of_utterance>``."""
    full = render(list(messages), add_generation_prompt=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(list(messages[:k]), add_generation_prompt=True)
        upto = render(list(messages[: k + 1]), add_generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise DataError("the chat template does not render conversations prefix-consistently; "
                            "cannot locate assistant turns")
        end = upto.rfind(eou)
        if end < len(prompt):
            raise DataError(f"assistant turn {k} does not end with {eou!r} in the rendered template")
        spans.append((len(prompt), end + len(eou)))
    return full, spans


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` (which gives offsets) behind our tokenizer wrapper."""
    return getattr(tokenizer, "backend", tokenizer)


def char_span_labels(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (no special tokens added) and labels: id inside a span, else -100."""
    enc = _backend(tokenizer).encode(text, add_special_tokens=False)
    labels = [tid if any(s <= start < e for s, e in spans) else IGNORE_INDEX
              for tid, (start, _) in zip(enc.ids, enc.offsets)]
    return list(enc.ids), labels


# -- the processor step --------------------------------------------------------------------------
def _single(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, torch.Tensor) else torch.as_tensor(x[0])


def align_by_utterance(u_ids: Sequence[int], u_labels: Sequence[int], e_ids: Sequence[int], eou_id: int) -> list[int]:
    """Carry labels from the unexpanded ids to the expanded ones by ``<end_of_utterance>`` anchors: the
    k-th segment (after the (k-1)-th ``<end_of_utterance>``, through the k-th) of both sequences is
    the same turn; a segment holding a label must be the same ids in both (checked), and the others
    (user turns, where media expand) stay masked."""
    def bounds(ids: Sequence[int]) -> list[int]:
        return [0, *(i + 1 for i, t in enumerate(ids) if t == eou_id), len(ids)]

    ub, eb = bounds(u_ids), bounds(e_ids)
    if len(ub) != len(eb):
        raise DataError(f"label alignment failed: {len(ub) - 2} <end_of_utterance> before image/video expansion, "
                        f"{len(eb) - 2} after")
    out = [IGNORE_INDEX] * len(e_ids)
    for k in range(len(ub) - 1):
        (a, b), (c, d) = ub[k: k + 2], eb[k: k + 2]
        if all(x == IGNORE_INDEX for x in u_labels[a:b]):
            continue
        if list(u_ids[a:b]) != list(e_ids[c:d]):
            raise DataError(f"label alignment failed: turn segment {k} holds an answer but is tokenized differently "
                            f"after image/video expansion (an image or video inside an answer?)")
        out[c:d] = u_labels[a:b]
    return out


@dataclass(frozen=True)
class MediaOptions:
    """How images are split and videos sampled (``data.image_splitting`` / ``video_fps`` /
    ``video_max_frames``); None: as the checkpoint's processor config says."""

    image_splitting: bool | None = None
    video_fps: float | None = None
    video_max_frames: int | None = None


def conversation_labels(conv: Conversation, processor: Any) -> tuple[str, list[int], list[int]]:
    """Rendered prompt (the SmolVLM2 video template when the conversation has a video, as the processor
    chooses, for every prefix) and its unexpanded ids and labels."""
    render = processor.apply_chat_template
    if conv.videos:
        from smolvlm.processing.chat import DEFAULT_VIDEO_CHAT_TEMPLATE

        render = functools.partial(render, chat_template=DEFAULT_VIDEO_CHAT_TEMPLATE)
    text, spans = assistant_char_spans(render, conv.messages)
    u_ids, u_labels = char_span_labels(processor.tokenizer, text, spans)
    return text, u_ids, u_labels


def expanded_ids(text: str, processor: Any, layouts: Sequence[Any], frames: Sequence[Any]) -> list[int]:
    """The ``input_ids`` that ``processor(text=[text], images, videos)`` gives, from each image's tile
    layout and each video's sampled ``VideoFrames`` only (no pixel work): markers replaced in one
    left-to-right pass, the frame-count word the largest frame count, as the processor does."""
    from smolvlm.processing.video_inputs import video_string

    word = max((len(f.timestamps) for f in frames), default=0)
    lays, vids = iter(layouts), iter(frames)

    def replace(m: re.Match[str]) -> str:
        if m.group() == VIDEO:
            return video_string(next(vids), word, processor.image_seq_len, processor.image_tokens)
        return processor.image_string(next(lays))

    pattern = re.compile(f"{re.escape(processor.image_tokens.image)}|{re.escape(VIDEO)}")
    return processor.tokenizer.encode(pattern.sub(replace, text))


def truncation(ids: Sequence[int], labels: Sequence[int], max_length: int | None, image_id: int,
               fake_id: int | None) -> tuple[int, str | None]:
    """Where a sample is cut for ``max_length``: ``(length to keep, None)``, or ``(0, why)`` when it must be
    dropped. The rule: cut the end of the text, never inside an image block (its ``<image>`` tokens and
    closing ``<fake_token_around_image>``); a cut that would cross an image, or leave no assistant
    token, drops the sample."""
    n = len(ids)
    if max_length is None or n <= max_length:
        return n, None
    last = max((i for i, t in enumerate(ids) if t == image_id), default=-1)
    media_end = last + 1 + (1 if 0 <= last < n - 1 and ids[last + 1] == fake_id else 0)
    if media_end > max_length:
        return 0, f"{n} tokens after image expansion; a cut at max_length {max_length} would fall inside an image"
    if all(x == IGNORE_INDEX for x in labels[:max_length]):
        return 0, f"{n} tokens after image expansion; a cut at max_length {max_length} would leave no answer token"
    return max_length, None


def encode_sample(sample: dict[str, Any] | Conversation, processor: Any, system_prompt: str | None = None,
                  options: MediaOptions = MediaOptions()) -> dict[str, torch.Tensor]:
    """One sample (either layout, ``data/samples.py``) -> unbatched ``input_ids/attention_mask/labels (T,)``
    and, with images or videos, ``pixel_values (N, 3, H, W)`` + ``pixel_attention_mask (N, H, W)``
    (image tiles and video frames in prompt order)."""
    conv = sample if isinstance(sample, Conversation) else to_conversation(sample, system_prompt)
    text, u_ids, u_labels = conversation_labels(conv, processor)
    kw: dict[str, Any] = {"do_image_splitting": options.image_splitting}
    if conv.videos:
        kw.update(videos=[conv.videos], fps=options.video_fps, max_frames=options.video_max_frames)
    enc = processor(text=[text], images=[conv.images] if conv.images else None, return_tensors="pt",
                    padding_side="right", **kw)
    e_ids = _single(enc["input_ids"])
    labels = align_by_utterance(u_ids, u_labels, e_ids.tolist(), processor.end_of_utterance_token_id)
    out = {
        "input_ids": e_ids.long(),
        "attention_mask": _single(enc["attention_mask"]).long(),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    if conv.images or conv.videos:
        out["pixel_values"] = _single(enc["pixel_values"])
        out["pixel_attention_mask"] = _single(enc["pixel_attention_mask"])
    return out


class SFTDataset(Sequence):
    """Raw samples encoded lazily on access (images are too big to keep encoded in memory).

    ``max_length``: samples are cut by ``truncation``'s rule. ``skip_bad``: a sample that fails to
    encode (a file changed since validation...) is reported once and the next one is used instead, so
    a bad sample never stops a run."""

    def __init__(self, samples: Sequence[dict[str, Any]], processor: Any, system_prompt: str | None = None,
                 options: MediaOptions = MediaOptions(), max_length: int | None = None, skip_bad: bool = False) -> None:
        self.samples, self.processor, self.system_prompt = samples, processor, system_prompt
        self.options, self.max_length, self.skip_bad = options, max_length, skip_bad
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def _encode(self, i: int) -> dict[str, torch.Tensor]:
        out = encode_sample(self.samples[i], self.processor, self.system_prompt, self.options)
        if self.max_length is not None and out["input_ids"].shape[0] > self.max_length:
            p = self.processor
            keep, why = truncation(out["input_ids"].tolist(), out["labels"].tolist(), self.max_length,
                                   p.image_token_id, p.fake_image_token_id)
            if why:
                raise DataError(why)
            out.update({k: out[k][:keep] for k in ("input_ids", "attention_mask", "labels")})
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not self.skip_bad:
            return self._encode(i)
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            try:
                return self._encode(j)
            except Exception as e:  # noqa: BLE001 - any failure of one sample: report it, use the next
                if j not in self._reported:
                    self._reported.add(j)
                    try:
                        name = sample_name(self.samples[j], f"sample {j}")
                    except Exception:  # noqa: BLE001
                        name = f"sample {j}"
                    print(f"warning: skipping {name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        raise DataError(f"none of the {n} samples could be encoded")


class SynthSamples(Sequence):
    """``synth`` samples made on access (same samples as ``make_dataset(n, split, seed,
    categories)``, without holding every image in memory)."""

    def __init__(self, n: int, split: str, seed: int, categories: Sequence[str] | None = None) -> None:
        self.n, self.split, self.seed = n, split, seed
        try:
            self.categories = synth.check_categories(categories)
        except ValueError as e:
            raise DataError(str(e)) from None
        synth.sample_seed(split, seed, max(n - 1, 0))  # validates split / seed / n up front

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return synth.dataset_sample(i, self.split, self.seed, self.categories)


def make_samples(generator: str, n: int, split: str, seed: int,
                 categories: Sequence[str] | None = None) -> Sequence[dict[str, Any]]:
    """Raw samples from a named generator (``"synth"``: ``smolvlm.synth`` round-robin over
    ``categories``, default all)."""
    if generator == "synth":
        return SynthSamples(n, split, seed, categories)
    raise DataError(f"unknown data generator {generator!r}; known: ['synth']")
