"""Expansion of each ``<image>`` marker into the tile layout the model was trained on (SPEC §3.1).

Mirrors transformers 5.23 ``processing_smolvlm.get_image_prompt_string`` /
``Idefics3Processor.replace_image_token`` and ``ProcessorMixin.get_text_with_replacements``:

* split image (rows, cols > 0): for each row, for each column
  ``<fake_token_around_image><row_r_col_c>`` + ``<image>`` x S; every row ends with ``"\\n"``; then
  ``"\\n<fake_token_around_image><global-img>"`` + ``<image>`` x S + ``<fake_token_around_image>``.
* unsplit image: ``<fake_token_around_image><global-img>`` + ``<image>`` x S + ``<fake_token_around_image>``.

Markers are matched as literal substrings, left to right, the i-th marker getting the i-th image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from smolvlm.processing.errors import PromptError


@dataclass(frozen=True)
class ImageTokens:
    """The strings used around image features (overridable by a SmolVLM2 tokenizer_config)."""

    image: str = "<image>"
    fake: str = "<fake_token_around_image>"
    global_img: str = "<global-img>"


def image_prompt_string(rows: int, cols: int, image_seq_len: int, tokens: ImageTokens = ImageTokens()) -> str:
    """Replacement text for one image with a ``rows x cols`` grid (0 x 0 = unsplit)."""
    block = tokens.image * image_seq_len
    global_block = f"{tokens.fake}{tokens.global_img}{block}{tokens.fake}"
    if rows == 0 and cols == 0:
        return global_block
    lines = []
    for r in range(1, rows + 1):
        lines.append("".join(f"{tokens.fake}<row_{r}_col_{c}>{block}" for c in range(1, cols + 1)) + "\n")
    return "".join(lines) + "\n" + global_block


def count_markers(text: str, tokens: ImageTokens = ImageTokens()) -> int:
    return text.count(tokens.image)


def check_marker_counts(texts: Sequence[str], images_per_prompt: Sequence[int], tokens: ImageTokens = ImageTokens()) -> None:
    """Raise a clear error if prompt i does not hold exactly as many markers as it has images."""
    if len(texts) != len(images_per_prompt):
        raise PromptError(
            f"got {len(texts)} prompt(s) but images for {len(images_per_prompt)} prompt(s); "
            "pass one list of images per prompt"
        )
    for i, (text, n_images) in enumerate(zip(texts, images_per_prompt)):
        n_markers = count_markers(text, tokens)
        if n_markers != n_images:
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise PromptError(
                f"prompt {i} has {n_markers} {tokens.image} marker(s) but {n_images} image(s) were given for it "
                f"(prompt {i}: {shown!r})"
            )


def expand_prompt(text: str, replacements: Sequence[str], tokens: ImageTokens = ImageTokens()) -> str:
    """Replace the i-th ``<image>`` marker of ``text`` with ``replacements[i]``."""
    pieces = text.split(tokens.image)
    if len(pieces) - 1 != len(replacements):
        raise PromptError(f"prompt has {len(pieces) - 1} {tokens.image} marker(s) but {len(replacements)} image(s)")
    out = [pieces[0]]
    for rep, piece in zip(replacements, pieces[1:]):
        out.append(rep)
        out.append(piece)
    return "".join(out)
