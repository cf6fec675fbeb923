"""Text-only answers: the backbone (SmolLM2-135M-Instruct from the GGUF, in its own ChatML format)
next to a SmolVLM model (SmolVLM chat template, no image), greedy, on fixed prompts. Shows whether
chat stays fluent after the LoRA stage. Prompts that the replay data of configs/default-model.yaml
also asks are marked.

    .venv/bin/python bench/default_model/text_only.py [--model runs/default-model/final] [--out F.md]

Without --model: the shipped default model. Takes ~2 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

PROMPTS = [
    "What is the capital of France?",
    "What is 2 + 3?",
    "Name three fruits.",
    "Write one sentence about the sea.",
    "What is a rainbow?",
    "Give me a word that means small.",
    "Tell me a fun fact about sharks.",
    "What colour is a cucumber?",
    "Write a short poem about the night sky.",
    "Why do people need sleep?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="SmolVLM folder (default: the shipped default model)")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args()

    from smolvlm import SmolVLM, SmolVLMProcessor, answer
    from smolvlm.generation.generate import generate_ids
    from smolvlm.training import replay
    from smolvlm.training.recipe import load_recipe
    from smolvlm.synth.chat import chat_prompts

    repo = Path(__file__).resolve().parents[2]
    recipe = load_recipe(repo / "configs" / "default-model.yaml")
    in_replay = set(chat_prompts(recipe.replay.n, recipe.replay.seed)) if recipe.replay.n else set()
    if args.model:
        model, processor = SmolVLM.from_pretrained(args.model), SmolVLMProcessor.from_pretrained(args.model)
    else:
        model, processor = SmolVLM.from_pretrained("default"), SmolVLMProcessor.from_pretrained("default")
    base = SmolVLM.from_pretrained(args.model or "default")
    # the backbone alone: the same model with every LoRA delta and new row taken out is not at hand
    # for a merged folder, so rebuild it from the GGUF (text weights only, no new rows needed)
    from smolvlm.training.build import _text_from_backbone
    from smolvlm.training.recipe import ModelRecipe

    cfg, sd, _ = _text_from_backbone(ModelRecipe(), base.config.text_config.vocab_size)
    base.load_state_dict(sd, strict=False)
    tok = processor.tokenizer
    template = replay.backbone_chat_template("gguf:smollm2")
    rows = ["| prompt | in replay data | backbone (ChatML) | this model (SmolVLM template) |", "|---|---|---|---|"]
    for p in PROMPTS:
        (b,) = replay.backbone_answers(base, processor, [p], template, max_new_tokens=args.max_new_tokens)
        if b is None:  # unfinished: show the cut text
            ids = torch.tensor([tok.encode(replay.render_prompts(template, [p])[0])])
            g = generate_ids(base, ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            b = tok.decode(g[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip() + " ..."
        m = answer(model, processor, [{"role": "user", "content": [{"type": "text", "text": p}]}],
                   max_new_tokens=args.max_new_tokens).strip()
        cell = lambda s: s.replace("\n", " / ").replace("|", "\\|")  # noqa: E731
        rows.append(f"| {p} | {'yes' if p in in_replay else 'no'} | {cell(b)} | {cell(m)} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    if args.out:
        Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
