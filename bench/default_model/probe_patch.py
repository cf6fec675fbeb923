"""Does a finer tower read arbitrary words? Stage 1 with word targets on the ``text`` category alone
(random words and numbers in 20-44 px type), for two patch sizes, then probe (a) on held-out text
images: the share of tokens with text whose nearest SmolLM2 embedding row is one of their word pieces.
``--targets characters``: each glyph's single-character token instead of the word pieces (recipe key
``vision_pretrain.text_targets``: the token under each glyph's ink centre learns that glyph's
character; probe_spelling.py asks whether the frozen model can read those).

    .venv/bin/python bench/default_model/probe_patch.py --patch 32 16 --steps 100
    .venv/bin/python bench/default_model/probe_patch.py --patch 32 --targets pieces characters --steps 100

Builds the default model's architecture from ``configs/default-model.yaml`` (``model.vision.patch_size``
overridden), trains fresh towers in ``--out`` (default ``runs/probe-patch``) and prints a Markdown
table with the seconds per step. bf16 autocast where the CPU has it natively, as the recipe.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.processing.tokenizer import Tokenizer
from smolvlm.training import build, lexical, loop, recipe as recipe_mod, vision_pretrain as vp

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="runs/probe-patch")
    ap.add_argument("--targets", nargs="+", choices=lexical.TEXT_TARGETS, default=["pieces"])
    args = ap.parse_args(argv)
    rows = []
    for patch, targets in ((p, t) for p in args.patch for t in args.targets):
        rec = recipe_mod.load_recipe(REPO / "configs" / "default-model.yaml", [f"model.vision.patch_size={patch}"])
        mr = rec.model
        mr.tokenizer = str(REPO / mr.tokenizer)
        tok = Tokenizer.from_pretrained(mr.tokenizer)
        model, backbone = build.build_model(mr, tok.token_to_id("<image>"), len(tok))
        out = Path(args.out) / f"patch{patch}-{targets}"
        proc_dir = build.write_processor_files(mr, model.config.vision_config.image_size, model.config.image_seq_len,
                                               out / "processor")
        proc = SmolVLMProcessor.from_pretrained(proc_dir)
        t0 = time.perf_counter()
        vp.pretrain_vision(model, proc.image_processor, out, steps=args.steps, batch_size=32, lr=1e-3,
                           warmup_steps=min(50, args.steps // 5), autocast=rec.train.autocast, eval_every=args.steps,
                           tokenizer=proc.tokenizer, word_weight=1.0, backbone_rows=backbone, categories=["text"],
                           progress=False, text_targets=targets)
        per_step = (time.perf_counter() - t0) / args.steps
        grid = vp.TokenGrid.for_config(model.config)
        held = vp.DenseImages(proc.image_processor, grid, seed=3, categories=["text"], tokenizer=proc.tokenizer,
                              text_targets=targets)
        pv, tg, _ = held.batch(0, 64)
        words = lexical.WordTargetLoss(model.model.text_model.embed_tokens.weight[:backbone], tok.encode(" ")[0])
        with torch.no_grad(), loop.autocast_context("cpu", loop.autocast_dtype(rec.train.autocast, "cpu")):
            feats = torch.cat([vp.encode(model, pv[i:i + 16]).float() for i in range(0, len(pv), 16)])
        r = words.readout(feats, tg["words"])
        rows.append((patch, targets, grid.n * grid.n, per_step, r))
        print(f"patch {patch}, {targets}: {r}", file=sys.stderr, flush=True)
    print(f"| patch | targets | tokens per image | s / step (32 images) | text: nearest row is a target | "
          f"targets among the k nearest | blanks read as space |")
    print("|---|---|---|---|---|---|---|")
    for patch, targets, n, sec, r in rows:
        print(f"| {patch} px | {targets} | {n} | {sec:.1f} | {r['words_top1']:.3f} | {r['words_recall']:.3f} | "
              f"{r['blank_top1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
