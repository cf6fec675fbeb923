"""Stage-1 word targets: each visual token learns to *be* the words it shows, in the frozen text
model's own input-embedding space (issue #21; the idea of "Frozen", Tsimpoukelli et al. 2021, and
"Linearly mapping from image to text space", Merullo et al. 2022).

The connector output ``o`` of every visual token is scored against every row ``e`` of SmolLM2's
frozen embedding table (the backbone's rows only, not the added image tokens) and trained with
cross-entropy towards what the generator knows lies under that token:

* text, ``text_targets="pieces"``: the word pieces (the tokenizer's own, of the drawn line with a
  leading space, as the line would read inside a sentence) whose ink touches the token, in reading
  order; ``"characters"``: each glyph's own single-character token, held by the one token under the
  glyph's ink centre (a letter over two tokens is read twice by the frozen model:
  ``bench/default_model/probe_spelling.py``), in reading order; ``"hybrid"``: characters for the
  ``text`` category's arbitrary words, pieces for the recurring strings of receipts and forms (run 7
  lost receipts with characters everywhere: ``bench/default_model/RESULTS.md``);
* a shape: its colour word and its kind word (" red", " circle"); a bar: its colour and " bar";
* nothing: the space token, at a lower weight (``empty_weight``).

A token holding several pieces is trained towards all of them (mean of their cross-entropies), so
its output moves to where those pieces' embeddings sit together.

Logits are cosine similarities over a temperature, ``cos(o, e) / tau``, not the raw ``o @ E^T``: with
embedding norms of 2-3 (SmolLM2-135M), ranking one row first among 49,152 by a plain dot product
needs ``|o|`` several times any embedding's norm, and the frozen language model would then read
vectors far larger than any word it knows. ``norm_weight`` pulls ``|o|`` to its targets' mean
embedding norm, so the outputs sit where the words' embeddings are in direction and in size.

``readout`` is the issue's probe (a): each visual token's nearest embedding row (the same cosine),
compared with its targets, no language model run.
"""

from __future__ import annotations

from dataclasses import dataclass
import typing
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from smolvlm.training.recipe import TextTargets

IGNORE = -100
MAX_PIECES = 12  # word pieces kept per visual token (small print can put more under one; reading order)
TEXT_TARGETS = typing.get_args(TextTargets)  # the recipe key vision_pretrain.text_targets


@dataclass(frozen=True)
class WordVocab:
    """Token ids of the words the targets use, from the model's tokenizer."""

    space: int
    words: dict[str, int]  # colour and region-kind names ("red", "circle", "bar") -> their id with a leading space

    @classmethod
    def build(cls, tokenizer: Any, names: Sequence[str]) -> "WordVocab":
        def one(word: str) -> int:
            ids = tokenizer.encode(word)
            if len(ids) != 1:
                raise ValueError(f"word target {word!r} is {len(ids)} tokens for this tokenizer, need 1")
            return ids[0]

        return cls(one(" "), {n: one(" " + n) for n in names})


def line_pieces(tokenizer: Any, glyphs: Sequence[Any]) -> list[tuple[int, list[Any]]]:
    """Word pieces of one drawn line (``glyphs`` of one ``text`` call) with the glyphs each covers.

    The line is tokenized with a leading space; a piece covering only spaces has no glyph and is
    dropped."""
    text = " " + glyphs[0].text
    by_index = {g.index + 1: g for g in glyphs}
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    out = []
    for tid, (a, b) in zip(enc.ids, enc.offsets):
        inked = [by_index[i] for i in range(a, b) if i in by_index]
        if inked:
            out.append((tid, inked))
    return out


def line_characters(tokenizer: Any, glyphs: Sequence[Any]) -> list[tuple[int, Any]]:
    """Each inked glyph of one drawn line with its character's own token (no leading space), when the
    tokenizer spells that character as one token (SmolLM2's does every letter, digit and the
    generator's punctuation); spaces and characters of several tokens carry none."""
    out = []
    for g in glyphs:
        ids = tokenizer.encode(g.char) if g.char.strip() else []
        if len(ids) == 1:
            out.append((ids[0], g))
    return out


def word_targets(sample: dict[str, Any], glyphs: Sequence[Any], grid: Any, tokenizer: Any,
                 vocab: WordVocab, regions_of: Any, text_targets: str = "pieces") -> list[torch.Tensor]:
    """Per image of a synth ``sample``: (n*n, MAX_PIECES) target ids per visual token, padded with
    ``IGNORE``; a token with nothing drawn on it gets the space id alone. ``regions_of(sample)``
    gives each image's filled regions (``vision_pretrain._shapes_of``); ``text_targets`` says what
    text is read as (module doc)."""
    if text_targets not in TEXT_TARGETS:
        raise ValueError(f"text_targets must be one of {TEXT_TARGETS}, got {text_targets!r}")
    as_characters = text_targets == "characters" or (text_targets == "hybrid" and sample.get("category") == "text")
    n, out = grid.n, []
    runs: dict[int, list[Any]] = {}
    for g in glyphs:
        runs.setdefault(g.run, []).append(g)
    for img, (regions, _) in zip(sample["images"], regions_of(sample), strict=True):
        sx, sy = grid.image_size / img.width, grid.image_size / img.height
        cells: list[list[int]] = [[] for _ in range(n * n)]
        for r in regions:
            x0, y0, x1, y1 = r["box"]
            words = [vocab.words[r["colour"]], vocab.words[r["kind"]]]
            hit = {i * n + j for i in range(n) for j in range(n)
                   if x0 <= (j + 0.5) * grid.tok_px / sx <= x1 and y0 <= (i + 0.5) * grid.tok_px / sy <= y1}
            centre = grid.token_of((x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy)
            if centre is not None:
                hit.add(centre[0] * n + centre[1])
            for t in hit:
                cells[t] = [w for w in words if w not in cells[t]] + cells[t]
        for run in sorted(runs.values(), key=lambda gs: gs[0].box[1]):
            if run[0].image is not img:
                continue
            if as_characters:
                for tid, g in line_characters(tokenizer, run):
                    at = grid.token_of((g.box[0] + g.box[2]) / 2 * sx, (g.box[1] + g.box[3]) / 2 * sy)
                    if at is not None:
                        cells[at[0] * n + at[1]].append(tid)
                continue
            for tid, inked in line_pieces(tokenizer, run):
                for t in _touched(grid, [g.box for g in inked], sx, sy):
                    cells[t].append(tid)
        t = torch.full((n * n, MAX_PIECES), IGNORE, dtype=torch.long)
        for i, ids in enumerate(cells):
            ids = ids[:MAX_PIECES] or [vocab.space]
            t[i, :len(ids)] = torch.tensor(ids)
        out.append(t)
    return out


def _touched(grid: Any, boxes: Sequence[tuple[int, int, int, int]], sx: float, sy: float) -> list[int]:
    """Row-major indices of the visual tokens the ink ``boxes`` (image pixels) overlap on the tower's
    square: a piece is the target of every token its ink touches, so a word in large type is what
    all the tokens it covers read (with only the token under its centre, its neighbours would be
    taught "nothing here" on top of ink)."""
    x0, y0 = min(b[0] for b in boxes) * sx, min(b[1] for b in boxes) * sy
    x1, y1 = max(b[2] for b in boxes) * sx, max(b[3] for b in boxes) * sy
    last = grid.n - 1
    r0, r1 = min(int(y0 // grid.tok_px), last), min(int(max(y0, y1 - 1) // grid.tok_px), last)
    c0, c1 = min(int(x0 // grid.tok_px), last), min(int(max(x0, x1 - 1) // grid.tok_px), last)
    return [r * grid.n + c for r in range(max(r0, 0), r1 + 1) for c in range(max(c0, 0), c1 + 1)]


class WordTargetLoss:
    """Cross-entropy of connector outputs against a frozen embedding table (see module doc)."""

    def __init__(self, embeddings: torch.Tensor, space_id: int, tau: float = 0.07,
                 empty_weight: float = 0.25, norm_weight: float = 1.0) -> None:
        e = embeddings.detach().float()
        self.norms = e.norm(dim=-1)
        self.unit = e / self.norms[:, None].clamp_min(1e-6)
        self.space, self.tau, self.empty_weight, self.norm_weight = space_id, tau, empty_weight, norm_weight

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., D) connector outputs -> (..., V) cosine logits / tau."""
        unit = self.unit.to(feats.device)
        return F.normalize(feats.float(), dim=-1) @ unit.T / self.tau

    def __call__(self, feats: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``feats`` (N, T, D), ``targets`` (N, T, K): the loss parts ``words`` and ``word_norm``."""
        logp = self.logits(feats).log_softmax(-1)
        tg = targets.to(feats.device)
        keep = tg != IGNORE
        nll = -logp.gather(-1, tg.clamp_min(0)) * keep  # (N, T, K)
        per_token = nll.sum(-1) / keep.sum(-1).clamp_min(1)
        empty = (tg[..., 0] == self.space) & (keep.sum(-1) == 1)
        words = per_token[~empty].mean() if (~empty).any() else per_token.sum() * 0
        blank = per_token[empty].mean() if empty.any() else per_token.sum() * 0
        norms = self.norms.to(feats.device)[tg.clamp_min(0)]
        want = (norms * keep).sum(-1) / keep.sum(-1).clamp_min(1)
        norm = (feats.float().norm(dim=-1) / want - 1).square().mean()
        return {"words": words + self.empty_weight * blank, "word_norm": self.norm_weight * norm}

    @torch.no_grad()
    def readout(self, feats: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Probe (a): nearest embedding row of each visual token vs its targets. ``words_top1``: over
        tokens with something drawn, the nearest row is one of its targets; ``words_recall``: the
        share of all target pieces found among each token's k nearest rows (k = its number of
        targets); ``blank_top1``: empty tokens read as the space."""
        tg = targets.to(feats.device)
        keep = tg != IGNORE
        top = self.logits(feats).topk(MAX_PIECES, dim=-1).indices  # (N, T, MAX)
        k = keep.sum(-1)
        empty = (tg[..., 0] == self.space) & (k == 1)
        first_hit = (tg == top[..., :1]).any(-1)
        ranks = torch.arange(MAX_PIECES, device=tg.device)
        in_topk = ((tg[..., :, None] == top[..., None, :]) & (ranks < k[..., None, None])).any(-1) & keep
        drawn = ~empty
        return {"words_top1": float(first_hit[drawn].float().mean()) if drawn.any() else float("nan"),
                "words_recall": float(in_topk[drawn].sum() / keep[drawn].sum().clamp_min(1)) if drawn.any() else float("nan"),
                "blank_top1": float(first_hit[empty].float().mean()) if empty.any() else float("nan")}
