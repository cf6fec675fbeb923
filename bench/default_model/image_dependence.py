"""Does a model use what its image shows? Answer loss with the sample's own image next to the same
prompt with another held-out sample's image (same category, same number of images), by category.

A model that reads the image has a lower loss with its own image (gap = other - own > 0); a gap
near 0 means its answers come from the question alone (the answer prior), whatever it was shown.

    .venv/bin/python bench/default_model/image_dependence.py [--model DIR] [--n 16] [--categories text,form]

Without --model: the shipped default model. Held-out samples (the ``eval`` split, seed 0, as
``smolvlm eval``); ~1 min for 16 per category on 2 CPU cores.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="SmolVLM folder (default: the shipped default model)")
    ap.add_argument("--n", type=int, default=16, help="samples per category (default 16)")
    ap.add_argument("--categories", default=None, help="comma-separated synth categories (default: all)")
    args = ap.parse_args()
    if args.n < 2:
        ap.error("--n must be at least 2 (each sample borrows another's image)")

    from smolvlm.cli.common import load_model_and_processor
    from smolvlm import synth
    from smolvlm.training.data import SynthSamples, encode_sample

    try:
        cats = synth.check_categories(args.categories.split(",") if args.categories else None)
        model, processor = load_model_and_processor(args.model)
    except (ValueError, OSError) as e:
        ap.error(str(e))

    rows = ["| category | samples | loss, own image | loss, another image | gap | own < other |",
            "|---|---|---|---|---|---|"]
    with torch.no_grad():
        for cat in cats:
            samples = SynthSamples(args.n, "eval", 0, [cat])
            enc = [encode_sample(samples[i], processor) for i in range(len(samples))]
            feats = [model.get_image_features(e["pixel_values"][None], e["pixel_attention_mask"][None]) for e in enc]
            own, other = [], []
            for i, e in enumerate(enc):
                # the next sample with as many image rows stands in (synth samples of one category
                # have a fixed image count, so this is normally i + 1)
                j = next((k % len(enc) for k in range(i + 1, i + len(enc)) if feats[k % len(enc)].shape == feats[i].shape), None)
                if j is None:
                    continue
                ids, labels = e["input_ids"][None], e["labels"][None]
                own.append(model(input_ids=ids, labels=labels, image_features=feats[i]).loss.item())
                other.append(model(input_ids=ids, labels=labels, image_features=feats[j]).loss.item())
            if not own:
                rows.append(f"| {cat} | 0 | - | - | - | - |")
                continue
            mo, mx = sum(own) / len(own), sum(other) / len(other)
            wins = sum(o < x for o, x in zip(own, other))
            rows.append(f"| {cat} | {len(own)} | {mo:.3f} | {mx:.3f} | {mx - mo:+.3f} | {wins}/{len(own)} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
