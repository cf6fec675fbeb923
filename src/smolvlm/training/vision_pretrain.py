"""Stage 1 of a from-scratch vision tower: dense labels from the synthetic generator, no language model.

Training a fresh vision tower only through a frozen language model's next-token loss is slow on
CPU: after 22k samples its features were barely better than a random tower's (bench/default_model).
The generator knows what it drew, so the tower and connector first learn it directly. Every visual
token (one per ``tok_px`` x ``tok_px`` region of the ``image_size`` square the processor feeds the
tower) gets:

* ``kind``: nothing / circle / square / triangle / bar of the shape covering the token;
* ``colour``: that shape's colour (index in ``COLOURS`` + 1; 0 = none);
* ``chars``: for each of ``slot_rows`` x ``slot_cols`` sub-slots of the token, the character whose
  ink centre lies in it (lower case; see ``CHARS``), from ``draw.record_glyphs``;

and every image its ``background`` name where the scene has one (shape scenes). Linear heads read
these from the connector output, the very vectors the language model will see, so stage 2 starts
from features that linearly hold what each region shows and where. With ``word_weight`` > 0 the
connector output of every token is also trained to *be* the words it shows in the frozen text
model's embedding space (``lexical.py``, the ``words`` target), so that the language model reads
visual tokens as it reads text. Coordinates follow the
processor: an unsplit image is stretched to ``image_size`` x ``image_size`` (``image.split``).

Training is the one loop's (``loop.run``): ``DenseLoss`` is the loss, the tower, connector and heads
(``TowerAndHeads``) the trained parameters, and each step's batch the next ``batch_size`` images.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm import synth
from smolvlm.synth.draw import BACKGROUNDS, COLOURS, SHAPES, record_glyphs
from smolvlm.training import lexical, loop
from smolvlm.training.recipe import OptimRecipe, ScheduleRecipe, TrainRecipe

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-:"  # class i + 1; 0 = no character; len + 1 = any other
KINDS = ("none", *SHAPES, "bar")
COLOUR_NAMES = tuple(sorted(COLOURS))
BACKGROUND_NAMES = tuple(sorted(BACKGROUNDS))
IGNORE = -100
VISION_PREFIXES = ("model.vision_model.", "model.connector.")


def char_class(ch: str) -> int:
    i = CHARS.find(ch.lower())
    return i + 1 if i >= 0 else len(CHARS) + 1


@dataclass(frozen=True)
class TokenGrid:
    """Where visual tokens sit on the tower's input square: ``n`` x ``n`` tokens of ``tok_px`` pixels."""

    image_size: int
    n: int
    slot_rows: int = 4
    slot_cols: int = 8

    @classmethod
    def for_config(cls, config: Any, slot_rows: int = 4, slot_cols: int = 8) -> "TokenGrid":
        v = config.vision_config
        n = v.image_size // (v.patch_size * config.scale_factor)
        return cls(v.image_size, n, slot_rows, slot_cols)

    @property
    def tok_px(self) -> float:
        return self.image_size / self.n

    @property
    def n_slots(self) -> int:
        return self.slot_rows * self.slot_cols

    def token_of(self, x: float, y: float) -> tuple[int, int] | None:
        """Token (row, col) holding pixel (x, y) of the square, or None outside it."""
        if not (0 <= x < self.image_size and 0 <= y < self.image_size):
            return None
        return int(y // self.tok_px), int(x // self.tok_px)

    def slot_of(self, x: float, y: float) -> int:
        t = self.tok_px
        r = min(int((y % t) / (t / self.slot_rows)), self.slot_rows - 1)
        c = min(int((x % t) / (t / self.slot_cols)), self.slot_cols - 1)
        return r * self.slot_cols + c


def _shapes_of(sample: dict[str, Any]) -> list[tuple[list[dict], str | None]]:
    """Per image: the filled regions drawn on it (``kind``, ``colour``, ``box``) and its named background."""
    meta, cat = sample["meta"], sample["category"]
    if cat in ("shapes", "caption"):
        return [(meta["shapes"], meta["background"])]
    if cat == "multi_image":
        return [(p["shapes"], p["background"]) for p in meta["panels"]]
    if cat == "chart":
        return [([{"kind": "bar", "colour": meta["colour"], "box": b} for b in meta["boxes"]], None)]
    return [([], None) for _ in sample["images"]]


def dense_targets(sample: dict[str, Any], glyphs: Sequence[Any], grid: TokenGrid) -> list[dict[str, torch.Tensor]]:
    """Targets of every image of a synth ``sample`` (see module doc); ``glyphs`` from ``record_glyphs``."""
    n, out = grid.n, []
    for img, (regions, bg) in zip(sample["images"], _shapes_of(sample), strict=True):
        sx, sy = grid.image_size / img.width, grid.image_size / img.height
        kind = torch.zeros(n, n, dtype=torch.long)
        colour = torch.zeros(n, n, dtype=torch.long)
        for r in regions:
            x0, y0, x1, y1 = r["box"]
            k, c = KINDS.index(r["kind"]), COLOUR_NAMES.index(r["colour"]) + 1
            hits = {(i, j) for i in range(n) for j in range(n)
                    if x0 <= (j + 0.5) * grid.tok_px / sx <= x1 and y0 <= (i + 0.5) * grid.tok_px / sy <= y1}
            centre = grid.token_of((x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy)
            for i, j in hits | ({centre} if centre else set()):
                kind[i, j], colour[i, j] = k, c
        chars = torch.zeros(n, n, grid.n_slots, dtype=torch.long)
        for g in glyphs:
            if g.image is not img:
                continue
            cx, cy = (g.box[0] + g.box[2]) / 2 * sx, (g.box[1] + g.box[3]) / 2 * sy
            tok = grid.token_of(cx, cy)
            if tok is not None:
                chars[tok[0], tok[1], grid.slot_of(cx, cy)] = char_class(g.char)
        background = BACKGROUND_NAMES.index(bg) if bg is not None else IGNORE
        out.append({"kind": kind.flatten(), "colour": colour.flatten(), "chars": chars.flatten(0, 1),
                    "background": torch.tensor(background)})
    return out


class DenseHeads(nn.Module):
    """Linear read-outs of the dense targets from connector outputs (B, n*n, D)."""

    def __init__(self, dim: int, n_slots: int) -> None:
        super().__init__()
        self.n_slots = n_slots
        self.kind = nn.Linear(dim, len(KINDS))
        self.colour = nn.Linear(dim, len(COLOUR_NAMES) + 1)
        self.background = nn.Linear(dim, len(BACKGROUND_NAMES))
        self.chars = nn.Linear(dim, n_slots * (len(CHARS) + 2))

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        b, t, _ = feats.shape
        return {"kind": self.kind(feats), "colour": self.colour(feats), "background": self.background(feats.mean(1)),
                "chars": self.chars(feats).view(b, t, self.n_slots, len(CHARS) + 2)}

    @staticmethod
    def losses(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, lg in logits.items():
            tg = targets[name]
            if name == "chars":  # most slots are empty: weigh inked and empty slots equally, or it learns "empty"
                ce = F.cross_entropy(lg.float().flatten(0, -2), tg.flatten(), reduction="none")
                ink = tg.flatten() > 0
                out[name] = (ce[ink].mean() if ink.any() else ce.sum() * 0) + ce[~ink].mean()
            elif (tg != IGNORE).any():
                out[name] = F.cross_entropy(lg.float().flatten(0, -2), tg.flatten(), ignore_index=IGNORE)
            else:  # e.g. no image of the batch has a named background (text-only batches): nothing to learn, not NaN
                out[name] = lg.sum() * 0
        return out


def accuracies(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy per target; for ``chars`` only over slots that hold a character (``chars_ink``),
    and whether every slot of an image is right, empty ones included (``chars_exact``)."""
    out = {}
    for name in ("kind", "colour", "background"):
        keep = targets[name] != IGNORE
        out[name] = float((logits[name].argmax(-1) == targets[name])[keep].float().mean()) if keep.any() else float("nan")
    pred, tg = logits["chars"].argmax(-1), targets["chars"]
    ink = tg > 0
    out["chars_ink"] = float((pred == tg)[ink].float().mean()) if ink.any() else float("nan")
    out["chars_exact"] = float((pred == tg).flatten(1).all(1).float().mean())
    return out


# -- data ---------------------------------------------------------------------------------------
class DenseImages:
    """Images and their dense targets from the synth generator, round-robin over categories.
    Item ``i`` is the images of sample ``synth.sample_seed("train", seed, i)``: training seeds,
    never the held-out evaluation split. With a ``tokenizer`` each image's targets also hold
    ``words`` (``lexical.word_targets``; ``text_targets``: text read as word pieces or characters)."""

    def __init__(self, image_processor: Any, grid: TokenGrid, seed: int = 0,
                 categories: Sequence[str] | None = None, split: str = "train", tokenizer: Any = None,
                 text_targets: str = "pieces") -> None:
        self.proc, self.grid, self.seed, self.split = image_processor, grid, seed, split
        self.categories = synth.check_categories(categories)
        self.tokenizer, self.text_targets = tokenizer, text_targets
        self.vocab = lexical.WordVocab.build(tokenizer, (*COLOUR_NAMES, *KINDS[1:])) if tokenizer is not None else None

    def sample(self, i: int) -> tuple[list[Any], list[dict[str, torch.Tensor]]]:
        with record_glyphs() as glyphs:
            s = synth.dataset_sample(i, self.split, self.seed, self.categories)
        targets = dense_targets(s, glyphs, self.grid)
        if self.tokenizer is not None:
            words = lexical.word_targets(s, glyphs, self.grid, self.tokenizer, self.vocab, _shapes_of,
                                         self.text_targets)
            targets = [{**t, "words": w} for t, w in zip(targets, words, strict=True)]
        return s["images"], targets

    def batch(self, start: int, n_images: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """At least ``n_images`` images from samples ``start, start + 1, ...``: pixel values
        (N, 3, S, S), stacked targets, and the next sample index."""
        images, targets, i = [], [], start
        while len(images) < n_images:
            ims, tgs = self.sample(i)
            images += ims
            targets += tgs
            i += 1
        batch = self.proc([[im] for im in images], do_image_splitting=False)
        pv = torch.from_numpy(batch.pixel_values[:, 0])  # (N, 3, S, S): one unsplit image per row
        stacked = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
        return pv, stacked, i


# -- the task for the one loop ----------------------------------------------------------------------
@dataclass
class PretrainResult:
    steps: int
    images: int
    seconds: float
    metrics: dict[str, float]
    path: Path


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) full unpadded images -> connector outputs (N, n*n, D), as inference encodes a tile."""
    return model._encode_tiles(pixel_values.to(device=_device(model), dtype=model.dtype), None)


class TowerAndHeads(nn.Module):
    """The VLM and the dense heads as one module, so the loop's optimizer and clipping see both."""

    def __init__(self, vlm: nn.Module, heads: DenseHeads) -> None:
        super().__init__()
        self.vlm, self.heads = vlm, heads


class DenseLoss:
    """Sum of the heads' losses on one ``(pixel_values, targets)`` batch, plus ``word_weight`` times the
    word-target loss (``lexical.WordTargetLoss``) when one is given; parts logged as ``loss_<name>``."""

    def __init__(self, words: lexical.WordTargetLoss | None = None, word_weight: float = 0.0) -> None:
        self.words, self.word_weight = words, word_weight

    def weight(self, batch: Any) -> int:
        return 1

    def __call__(self, model: TowerAndHeads, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pv, targets = batch
        dev = _device(model.vlm)
        feats = encode(model.vlm, pv).float()
        dense = {k: v.to(dev) for k, v in targets.items() if k != "words"}
        losses = DenseHeads.losses(model.heads(feats), dense)
        if self.words is not None and self.word_weight:
            losses.update({k: self.word_weight * v for k, v in self.words(feats, targets["words"]).items()})
        return sum(losses.values()), {f"loss_{k}": v for k, v in losses.items()}


def vision_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if n.startswith(VISION_PREFIXES)}


def load_vision_state(model: Any, path: str | Path) -> None:
    """Load stage-1 weights (vision tower + connector) saved by ``pretrain_vision``; strict on names and shapes."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = dict(model.named_parameters())
    want = {n for n in params if n.startswith(VISION_PREFIXES)}
    if set(saved) != want:
        raise ValueError(f"{path}: vision weights do not match the model (missing {sorted(want - set(saved))[:3]}, "
                         f"unexpected {sorted(set(saved) - want)[:3]})")
    with torch.no_grad():
        for n, t in saved.items():
            if params[n].shape != t.shape:
                raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(t)


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def pretrain_vision(model: Any, image_processor: Any, out_dir: str | Path, *, steps: int, batch_size: int = 32,
                    lr: float = 1e-3, warmup_steps: int = 50, weight_decay: float = 0.0, seed: int = 0,
                    autocast: str = "none", device: str = "cpu", eval_images: int = 128, eval_every: int = 100,
                    progress: bool = True, tokenizer: Any = None, word_weight: float = 0.0,
                    backbone_rows: int | None = None, categories: Sequence[str] | None = None,
                    text_targets: str = "pieces") -> PretrainResult:
    """Train ``model``'s vision tower + connector on dense targets with ``loop.run`` (AdamW, gradient
    clip 1.0, warmup then cosine to 5 % of ``lr``); save them to ``out_dir/vision.safetensors``
    (atomically) with ``metrics.jsonl`` (one line per step; held-out accuracies every ``eval_every``
    steps and at the end), ``loss.png`` and ``summary.json``. ``batch_size`` counts images, so
    ``samples_per_s`` in the metrics is images per second. Other parameters are untouched;
    ``requires_grad`` flags are restored afterwards. No checkpoints: an unfinished stage 1 reruns.

    ``word_weight`` > 0 (needs ``tokenizer``) adds the word targets (``lexical.py``), scored against
    the text model's first ``backbone_rows`` embedding rows (default: all), frozen; ``text_targets``
    (``lexical.TEXT_TARGETS``) says whether drawn text is read as word pieces or characters. ``categories``:
    the synth categories to draw from (default: all; probes train on one)."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    grid = TokenGrid.for_config(model.config)
    both = TowerAndHeads(model, DenseHeads(model.config.text_config.hidden_size, grid.n_slots))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(VISION_PREFIXES))
    if word_weight and tokenizer is None:
        raise ValueError("word targets (word_weight > 0) need the tokenizer")
    tok = tokenizer if word_weight else None
    train = DenseImages(image_processor, grid, seed=seed, tokenizer=tok, categories=categories, text_targets=text_targets)
    held = DenseImages(image_processor, grid, seed=seed + 1, tokenizer=tok, categories=categories,
                       text_targets=text_targets)
    words = None
    if word_weight:
        table = model.model.text_model.embed_tokens.weight
        words = lexical.WordTargetLoss(table[:backbone_rows or len(table)], space_id=train.vocab.space)  # other training seeds, never the eval split
    eval_pv, eval_tg, _ = held.batch(0, eval_images)
    amp = loop.autocast_dtype(autocast, device)

    def batches(position: int) -> tuple[list[Any], int, int]:
        pv, tg, nxt = train.batch(position, batch_size)
        return [(pv, tg)], nxt, len(pv)

    task = loop.Task(DenseLoss(words, word_weight), batches,
                     lambda m: evaluate_dense(m.vlm, m.heads, eval_pv, eval_tg, amp, words=words))
    cfg = TrainRecipe(output_dir=str(out), max_steps=steps, batch_size=batch_size, grad_clip=1.0,
                      eval_every=max(1, eval_every), seed=seed, autocast=autocast, device=device, progress=progress)
    sched = ScheduleRecipe(kind="cosine", warmup_steps=warmup_steps, min_lr_ratio=0.05)
    t0 = time.perf_counter()
    try:
        result = loop.run(both, task, cfg, OptimRecipe(lr=lr, weight_decay=weight_decay), sched, checkpoints=False,
                          desc="vision pretrain")
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    seconds = time.perf_counter() - t0
    _save_atomic(vision_state(model), out / "vision.safetensors")
    summary = {"steps": steps, "images": result.samples, "seconds": round(seconds, 1),
               "images_per_s": round(result.samples / seconds, 2), "held_out": result.eval}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return PretrainResult(steps, result.samples, seconds, result.eval, out / "vision.safetensors")


@torch.no_grad()
def evaluate_dense(model: Any, heads: DenseHeads, pixel_values: torch.Tensor, targets: dict[str, torch.Tensor],
                   autocast: torch.dtype | None = torch.bfloat16, chunk: int = 32,
                   words: lexical.WordTargetLoss | None = None) -> dict[str, float]:
    """Held-out accuracies of the heads (``accuracies``), and with ``words`` the nearest-embedding
    read-out of the word targets (``WordTargetLoss.readout``)."""
    was = model.training
    model.eval()
    parts, feats = [], []
    for i in range(0, len(pixel_values), chunk):
        with loop.autocast_context(_device(model).type, autocast):
            f = encode(model, pixel_values[i:i + chunk])
            parts.append({k: v.float().cpu() for k, v in heads(f).items()})
        if words is not None:
            feats.append(f.float().cpu())
    model.train(was)
    logits = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out = accuracies(logits, targets)
    if words is not None:
        out.update(words.readout(torch.cat(feats), targets["words"]))
    return out


@torch.no_grad()
def match_feature_scale(model: Any, pixel_values: torch.Tensor, n_rows: int) -> float:
    """Scale the connector so its outputs have the per-dimension std of the text model's first
    ``n_rows`` embedding rows (what a frozen language model is used to). Returns the factor."""
    emb_std = float(model.model.text_model.embed_tokens.weight[:n_rows].float().std())
    feat_std = float(encode(model, pixel_values).float().std())
    factor = emb_std / max(feat_std, 1e-12)
    model.model.connector.modality_projection.proj.weight.mul_(factor)
    return factor
