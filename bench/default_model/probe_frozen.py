"""Issue #21's two cheap probes of a stage-1 tower trained with word targets (training/lexical.py),
run before any stage 2, on held-out ``text`` images of one line (other training seeds than stage 1's):

(a) nearest-embedding read-out: each visual token -> its nearest row of SmolLM2's embedding table
    (the cosine the loss uses), the non-space pieces joined in reading order, compared with the line
    drawn (each distinct piece once; exact, and character accuracy = 1 - edit distance / length); then per category, the
    share of tokens whose nearest row is one of their targets;
(b) the *frozen* SmolLM2-135M-Instruct (no LoRA, its own ChatML prompt) asked "What is the word
    above?" with the 36 visual tokens in place of the image, against the same prompt with the true
    text's embeddings in the same slots (each token's target pieces averaged: what the loss pulls it
    to), the upper bound, and with the line typed as text, the ceiling.

    .venv/bin/python bench/default_model/probe_frozen.py --run runs/default-model [--n 40]

Reads ``<run>/recipe.yaml`` (the model) and ``<run>/vision_pretrain/vision.safetensors``; writes
nothing. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from smolvlm import synth
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.synth.draw import record_glyphs
from smolvlm.training import build, lexical, recipe as recipe_mod, vision_pretrain as vp

QUESTION = "What is the word above? Answer with the word only."


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def char_acc(pred: str, gold: str) -> float:
    return max(0.0, 1 - edit_distance(pred.lower(), gold.lower()) / max(1, len(gold)))


def greedy(model, embeds: torch.Tensor, stop: set[int], max_new: int = 10) -> list[int]:
    """Greedy decoding from ``embeds`` (1, L, D) by full recompute (short prompts, a few tokens)."""
    out: list[int] = []
    table = model.model.text_model.embed_tokens.weight
    for _ in range(max_new):
        logits = model(inputs_embeds=embeds).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt in stop:
            break
        out.append(nxt)
        embeds = torch.cat([embeds, table[nxt][None, None]], dim=1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a default-model run folder (holds recipe.yaml and vision_pretrain/)")
    ap.add_argument("--n", type=int, default=40, help="one-line text images to probe")
    args = ap.parse_args(argv)
    run = Path(args.run)
    weights = run / "vision_pretrain" / "vision.safetensors"
    if not (run / "recipe.yaml").is_file() or not weights.is_file():
        print(f"error: {run} holds no finished stage 1 ({weights})", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    rec = recipe_mod.load_recipe(run / "recipe.yaml")
    processor = SmolVLMProcessor.from_pretrained(run / "processor")
    tok = processor.tokenizer
    model, backbone_vocab = build.build_model(rec.model, processor.image_token_id, len(tok))  # the untouched backbone
    model.eval()
    vp.load_vision_state(model, weights)
    table = model.model.text_model.embed_tokens.weight
    grid = vp.TokenGrid.for_config(model.config)
    vocab = lexical.WordVocab.build(tok, (*vp.COLOUR_NAMES, *vp.KINDS[1:]))
    targets = rec.vision_pretrain.text_targets  # what stage 1 taught text to read as (word pieces or characters)
    words = lexical.WordTargetLoss(table[:backbone_vocab], space_id=tok.encode(" ")[0])
    head = torch.tensor(tok.encode("<|im_start|>user\n"))
    tail = torch.tensor(tok.encode("\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n"))
    stop = {tok.encode("<|im_end|>")[0], tok.encode("<|endoftext|>")[0]}
    rows = {"(a) read-out": [], "(b) visual tokens": [], "(b) true-text embeddings": [], "typed text": []}
    seen, i = 0, 0
    while seen < args.n:
        with record_glyphs() as glyphs:
            s = synth.dataset_sample(i, "train", rec.vision_pretrain.seed + 3, ("text",))
        i += 1
        if len(s["meta"]["lines"]) != 1:
            continue
        seen += 1
        gold = s["meta"]["lines"][0]
        (t,) = lexical.word_targets(s, glyphs, grid, tok, vocab, vp._shapes_of, targets)
        pv = torch.from_numpy(processor.image_processor([[s["images"][0]]], do_image_splitting=False).pixel_values[:, 0])
        feats = vp.encode(model, pv)[0].detach()  # (36, D)
        nearest = words.logits(feats).argmax(-1)
        read = [x for x in nearest.tolist() if x != words.space]
        if targets == "pieces":  # a piece is the target of every token its ink touches: read each distinct piece once
            read = list(dict.fromkeys(read))
        readout = tok.decode(read).strip()  # characters: one token per glyph, so every one in reading order
        truth = torch.stack([table[[x for x in r.tolist() if x >= 0]].mean(0) for r in t])
        typed = table[torch.tensor(tok.encode(" " + gold))]

        def ask(slots: torch.Tensor) -> str:
            e = torch.cat([table[head], slots, table[tail]])[None]
            return tok.decode(greedy(model, e, stop)).strip()

        for name, pred in (("(a) read-out", readout), ("(b) visual tokens", ask(feats)),
                           ("(b) true-text embeddings", ask(truth)), ("typed text", ask(typed))):
            said = bool(re.search(rf"\b{re.escape(gold.lower())}\b", pred.lower()))
            rows[name].append((synth.answers_match(pred, gold), said, char_acc(pred, gold), pred, gold))
    print(f"run {run}, {args.n} one-line held-out text images (stage-1 training seeds + 3)\n")
    print("| input in the image slots | exact | answer contains the line | character accuracy | first examples (pred / gold) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        ex = "; ".join(f"{p!r} / {g!r}" for *_, p, g in r[:3])
        print(f"| {name} | {sum(x[0] for x in r) / len(r):.2f} | {sum(x[1] for x in r) / len(r):.2f} | "
              f"{sum(x[2] for x in r) / len(r):.2f} | {ex} |")
    print("\n(a) per category, held-out images (nearest row is a target / blank tokens read as the space):\n")
    print("| category | words_top1 | words_recall | blank_top1 |")
    print("|---|---|---|---|")
    for cat in synth.CATEGORIES:
        d = vp.DenseImages(processor.image_processor, grid, seed=rec.vision_pretrain.seed + 3, categories=[cat],
                           tokenizer=tok, text_targets=targets)
        pv, tg, _ = d.batch(0, 32)
        r = words.readout(vp.encode(model, pv), tg["words"])
        print(f"| {cat} | {r['words_top1']:.2f} | {r['words_recall']:.2f} | {r['blank_top1']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
