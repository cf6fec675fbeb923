"""Prompt text: the image/video token strings, ``<image>`` expansion (SPEC §3.1), and prompts made
of markup and plain text.

Token strings are defined here once; every other module imports them. ``<video>`` is a processor
placeholder, not a vocabulary token (SPEC §3.5).

Expansion mirrors transformers 5.23 ``processing_smolvlm.get_image_prompt_string`` /
``Idefics3Processor.replace_image_token`` and ``ProcessorMixin.get_text_with_replacements``:

* split image (rows, cols > 0): for each row, for each column
  ``<fake_token_around_image><row_r_col_c>`` + ``<image>`` x S; every row ends with ``"\\n"``; then
  ``"\\n<fake_token_around_image><global-img>"`` + ``<image>`` x S + ``<fake_token_around_image>``.
* unsplit image: ``<fake_token_around_image><global-img>`` + ``<image>`` x S + ``<fake_token_around_image>``.

Markers are matched as literal substrings, left to right, the i-th marker getting the i-th image.

A ``Prompt`` keeps apart the text a chat template wrote (markup: its markers are expanded and its
special-token strings become control tokens) and the text a user wrote (plain: taken literally, so
a typed ``<end_of_utterance>`` or ``<image>`` is ordinary text). A plain string prompt, as passed
to ``SmolVLMProcessor.__call__``, is all markup, as in transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from smolvlm.processing.errors import PromptError

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMG_TOKEN = "<global-img>"
VIDEO_TOKEN = "<video>"  # text placeholder, not a vocabulary token (SPEC §3.5)
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"


@dataclass(frozen=True)
class ImageTokens:
    """The strings used around image features (overridable by a SmolVLM2 tokenizer_config)."""

    image: str = IMAGE_TOKEN
    fake: str = FAKE_TOKEN
    global_img: str = GLOBAL_IMG_TOKEN


def image_prompt_string(rows: int, cols: int, image_seq_len: int, tokens: ImageTokens = ImageTokens()) -> str:
    """Replacement text for one image with a ``rows x cols`` grid (0 x 0 = unsplit, also a video frame)."""
    block = tokens.image * image_seq_len
    global_block = f"{tokens.fake}{tokens.global_img}{block}{tokens.fake}"
    if rows == 0 and cols == 0:
        return global_block
    lines = []
    for r in range(1, rows + 1):
        lines.append("".join(f"{tokens.fake}<row_{r}_col_{c}>{block}" for c in range(1, cols + 1)) + "\n")
    return "".join(lines) + "\n" + global_block


@dataclass(frozen=True)
class Prompt:
    """One prompt as ``(text, plain)`` pieces; ``plain`` pieces are user text taken literally."""

    pieces: tuple[tuple[str, bool], ...]

    @classmethod
    def of(cls, text: "str | Prompt") -> "Prompt":
        """A prompt string is all markup (the reference's reading of ``processor(text=...)``)."""
        return text if isinstance(text, Prompt) else cls(((text, False),))

    def __str__(self) -> str:
        return "".join(t for t, _ in self.pieces)

    @property
    def has_plain(self) -> bool:
        return any(plain for _, plain in self.pieces)

    def count(self, marker: str) -> int:
        """Occurrences of ``marker`` in the markup (markers typed in plain text do not count)."""
        return sum(t.count(marker) for t, plain in self.pieces if not plain)

    def plain_count(self, marker: str) -> int:
        return sum(t.count(marker) for t, plain in self.pieces if plain)

    def sub(self, pattern: re.Pattern[str], replace: Callable[[re.Match[str]], str]) -> "Prompt":
        """``pattern.sub(replace, ...)`` on the markup pieces, left to right; plain pieces are kept."""
        return Prompt(tuple((t if plain else pattern.sub(replace, t), plain) for t, plain in self.pieces))


def count_markers(text: str | Prompt, tokens: ImageTokens = ImageTokens()) -> int:
    return Prompt.of(text).count(tokens.image)


def marker_mismatch(i: int, prompt: str | Prompt, marker: str, n_markers: int, n_given: int, what: str) -> PromptError:
    """The error for prompt ``i`` holding ``n_markers`` markers but ``n_given`` media of kind ``what``."""
    p = Prompt.of(prompt)
    text = str(p)
    shown = text if len(text) <= 80 else text[:77] + "..."
    msg = (f"prompt {i} has {n_markers} {marker} marker(s) but {n_given} {what}(s) were given for it; "
           f"each {marker} in the prompt takes one {what}, in order (prompt {i}: {shown!r})")
    if p.plain_count(marker):
        msg += f"; the {p.plain_count(marker)} {marker} typed in the message text are plain text, not markers"
    elif not p.has_plain and n_markers > n_given:
        msg += f"; a literal {marker} in a raw prompt string is a marker too"
    return PromptError(msg)


def check_marker_counts(texts: Sequence[str | Prompt], images_per_prompt: Sequence[int],
                        tokens: ImageTokens = ImageTokens()) -> None:
    """Raise a clear error if prompt i does not hold exactly as many markers as it has images."""
    if len(texts) != len(images_per_prompt):
        raise PromptError(
            f"got {len(texts)} prompt(s) but images for {len(images_per_prompt)} prompt(s); "
            "pass one list of images per prompt"
        )
    for i, (text, n_images) in enumerate(zip(texts, images_per_prompt)):
        n_markers = count_markers(text, tokens)
        if n_markers != n_images:
            raise marker_mismatch(i, text, tokens.image, n_markers, n_images, "image")


def expand_prompt(text: str | Prompt, replacements: Sequence[str], tokens: ImageTokens = ImageTokens()) -> str | Prompt:
    """Replace the i-th ``<image>`` marker of ``text`` with ``replacements[i]`` (same type as ``text``)."""
    prompt = Prompt.of(text)
    n = prompt.count(tokens.image)
    if n != len(replacements):
        raise PromptError(f"prompt has {n} {tokens.image} marker(s) but {len(replacements)} image(s)")
    reps = iter(replacements)
    out = prompt.sub(re.compile(re.escape(tokens.image)), lambda m: next(reps))
    return out if isinstance(text, Prompt) else str(out)
