"""Datasets -> chat messages -> model inputs with assistant-only labels.

Samples follow the_cauldron layout (also what ``smolvlm.synth`` produces); ``data/cauldron.py``
turns one into chat messages, all images at the start of the first user turn (SPEC 7). Labels
are -100 everywhere except the tokens of each assistant answer and its ``<end_of_utterance>``
(what the m4 SFT trains, SPEC 7 "Original m4 SFT"): system and user turns, the ``"Assistant:"``
prefix, the ``"\\n"`` after each utterance, image tokens and padding are masked.

How the spans are found, robustly: the chat template is rendered for each prefix of the
conversation, which gives the character span of every answer in the rendered text (between the
``"Assistant:"`` generation prompt and the end of its ``<end_of_utterance>``). The rendered text is
tokenized with offsets; a token is a target iff its start offset lies in a span. Those labels live on
the *unexpanded* text, where each ``<image>`` is one token; the processor then replaces every
``<image>`` by its tile block. Because each block is delimited by special tokens, the text between
images tokenizes identically in both, so labels are carried over segment by segment and every
carried token is checked to be the same id (an error otherwise, never silent misalignment).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from smolvlm import synth
from smolvlm.data.cauldron import DataError, Message, sample_to_messages
from smolvlm.training.collate import IGNORE_INDEX

EOU = "<end_of_utterance>"
IMAGE = "<image>"


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


# -- unexpanded labels -> expanded sequence -----------------------------------------------------
def _segments(ids: Sequence[int], image_id: int) -> list[tuple[int, int]]:
    """[start, end) of the text runs between ``<image>`` tokens (m images -> m + 1 runs)."""
    segs, start = [], 0
    for i, t in enumerate(ids):
        if t == image_id:
            segs.append((start, i))
            start = i + 1
    segs.append((start, len(ids)))
    return segs


def align_labels(u_ids: Sequence[int], u_labels: Sequence[int], e_ids: Sequence[int], image_id: int,
                 block_lengths: Callable[[], list[int]] | None = None) -> list[int]:
    """Carry labels from the unexpanded ids (one ``<image>`` token per image) to the expanded ids.

    Text runs before the first and after the last image sit at known offsets (start / end). Runs in
    between need each image block's length, asked from ``block_lengths`` only in that case (images in
    later user turns). Every carried run is checked id by id."""
    segs = _segments(u_ids, image_id)
    m = len(segs) - 1
    extra = len(e_ids) - (len(u_ids) - m)  # total tokens of all image blocks
    starts: list[int | None] = [None] * len(segs)
    starts[0] = 0
    starts[-1] = len(e_ids) - (segs[-1][1] - segs[-1][0])
    needs_middle = any(u_labels[i] != IGNORE_INDEX for a, b in segs[1:-1] for i in range(a, b))
    if needs_middle:
        if block_lengths is None:
            raise DataError("assistant turns between images need the image block lengths")
        blocks = block_lengths()
        if len(blocks) != m or sum(blocks) != extra:
            raise DataError(f"image block lengths {blocks} do not add up to the {extra} expanded tokens")
        pos = 0
        for k, (a, b) in enumerate(segs):
            starts[k] = pos
            pos += (b - a) + (blocks[k] if k < m else 0)
    out = [IGNORE_INDEX] * len(e_ids)
    for k, (a, b) in enumerate(segs):
        s = starts[k]
        if s is None:
            continue  # only masked text here (checked by needs_middle)
        if list(e_ids[s: s + b - a]) != list(u_ids[a:b]):
            raise DataError(f"label alignment failed: text run {k} of the prompt is tokenized differently "
                            f"after image expansion (expected ids {list(u_ids[a:b])[:8]}... at {s})")
        out[s: s + b - a] = u_labels[a:b]
    return out


# -- the processor step --------------------------------------------------------------------------
def _single(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, torch.Tensor) else torch.as_tensor(x[0])


def encode_sample(sample: dict[str, Any], processor: Any, system_prompt: str | None = None) -> dict[str, torch.Tensor]:
    """One sample -> unbatched ``input_ids/attention_mask/labels (T,)`` and, with images,
    ``pixel_values (N, 3, H, W)`` + ``pixel_attention_mask (N, H, W)``."""
    messages = sample_to_messages(sample, system_prompt)
    text, spans = assistant_char_spans(processor.apply_chat_template, messages)
    tok = processor.tokenizer
    u_ids, u_labels = char_span_labels(tok, text, spans)
    images = list(sample.get("images") or [])
    enc = processor(text=[text], images=[images] if images else None, return_tensors="pt", padding_side="right")
    e_ids = _single(enc["input_ids"])
    image_id = tok.token_to_id(IMAGE)

    def block_lengths() -> list[int]:
        return [len(_single(processor(text=[IMAGE], images=[[im]], return_tensors="pt")["input_ids"])) for im in images]

    labels = align_labels(u_ids, u_labels, e_ids.tolist(), image_id, block_lengths)
    out = {
        "input_ids": e_ids.long(),
        "attention_mask": _single(enc["attention_mask"]).long(),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    if images:
        out["pixel_values"] = _single(enc["pixel_values"])
        out["pixel_attention_mask"] = _single(enc["pixel_attention_mask"])
    return out


class SFTDataset(Sequence):
    """Raw samples encoded lazily on access (images are too big to keep encoded in memory)."""

    def __init__(self, samples: Sequence[dict[str, Any]], processor: Any, system_prompt: str | None = None) -> None:
        self.samples, self.processor, self.system_prompt = samples, processor, system_prompt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return encode_sample(self.samples[i], self.processor, self.system_prompt)


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
