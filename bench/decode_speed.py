"""Decode speed: our ``generate_ids`` vs transformers 5.23 ``generate`` on the real 256M shape.

Not run in CI. Both engines hold the *same* random weights (transformers builds
``Idefics3ForConditionalGeneration`` from shared/reference/SmolVLM-256M-Instruct/config.json,
seed 0; ours loads its state dict strictly: module names are checkpoint keys). The prompt is a
~100-token chat (text only); greedy; 64 new tokens, never stopping early (transformers:
``min_new_tokens=64``; ours: no stop ids).

Decode tokens/s = 63 / (t(64 new) - t(1 new)): the prefill cost cancels out. Each time is the
median of ``--reps`` runs after one warm-up run per engine and dtype; the two engines are timed
alternately in the same process (same machine load). transformers uses its default SDPA
attention and its default dynamic cache.

    .venv/bin/python bench/decode_speed.py [--dtypes float32 bfloat16] [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer

from smolvlm import SmolVLM, SmolVLMConfig
from smolvlm.generation.generate import generate_ids

ROOT = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("SMOLVLM_REFERENCE_DIR", ROOT.parent / "shared" / "reference")) / "SmolVLM-256M-Instruct"
NEW = 64
TEXT = ("Here is a short passage about the history of astronomy. Early observers tracked the motion of the "
        "planets against the fixed stars, built calendars from the cycles of the Sun and the Moon, and later "
        "used telescopes to discover moons, rings and distant galaxies. Please summarise it in a few sentences, "
        "then list three open questions that modern astronomers still study today, and explain in one line "
        "why each of them matters for our picture of the universe.")


def build_models(dtype: torch.dtype) -> tuple[torch.nn.Module, SmolVLM]:
    cfg = transformers.AutoConfig.from_pretrained(REF)
    torch.manual_seed(0)
    hf = transformers.Idefics3ForConditionalGeneration._from_config(cfg, dtype=torch.float32,
                                                                     attn_implementation="sdpa").eval()
    ours = SmolVLM.from_config(SmolVLMConfig.from_dict(json.loads((REF / "config.json").read_text())),
                               dtype=torch.float32).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours.generation_config = json.loads((REF / "generation_config.json").read_text())
    return hf.to(dtype), ours.to(dtype)


def prompt_ids() -> torch.Tensor:
    tok = Tokenizer.from_file(str(REF / "tokenizer.json"))
    text = f"<|im_start|>User: {TEXT}<end_of_utterance>\nAssistant:"
    return torch.tensor([tok.encode(text).ids])  # (1, T)


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_hf(hf, ids, n: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=49279, pad_token_id=2)


def run_ours(ours, ids, n: int) -> torch.Tensor:
    return generate_ids(ours, ids, max_new_tokens=n, eos_token_id=[])


def measure(dtype_name: str, reps: int) -> dict[str, object]:
    dtype = getattr(torch, dtype_name)
    hf, ours = build_models(dtype)
    ids = prompt_ids()
    engines = {"transformers": lambda n: run_hf(hf, ids, n), "smolvlm": lambda n: run_ours(ours, ids, n)}
    outs = {name: fn(NEW) for name, fn in engines.items()}  # warm-up (and the outputs to compare)
    times: dict[str, dict[int, list[float]]] = {name: {1: [], NEW: []} for name in engines}
    for _ in range(reps):
        for n in (1, NEW):
            for name, fn in engines.items():  # alternate engines so both see the same machine load
                times[name][n].append(timed(lambda: fn(n))[0])
    row: dict[str, object] = {"dtype": dtype_name, "prompt_tokens": ids.shape[1],
                              "same_tokens": torch.equal(outs["transformers"], outs["smolvlm"])}
    for name in engines:
        t1, tn = statistics.median(times[name][1]), statistics.median(times[name][NEW])
        row[f"{name}_prefill_s"] = t1
        row[f"{name}_decode_tok_s"] = (NEW - 1) / (tn - t1)
    row["speedup"] = row["smolvlm_decode_tok_s"] / row["transformers_decode_tok_s"]  # type: ignore[operator]
    return row


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine {platform.machine()} {platform.processor() or ''} | torch {torch.__version__} | "
          f"transformers {transformers.__version__} | threads {torch.get_num_threads()} | commit {commit()}")
    print(f"# SmolVLM-256M shape, random weights, greedy, {NEW} new tokens, median of {args.reps}")
    print("| dtype | prompt tok | same tokens | prefill s (tf / ours) | decode tok/s transformers | "
          "decode tok/s smolvlm | ratio |")
    print("|---|---|---|---|---|---|---|")
    for d in args.dtypes:
        r = measure(d, args.reps)
        print(f"| {r['dtype']} | {r['prompt_tokens']} | {r['same_tokens']} | "
              f"{r['transformers_prefill_s']:.3f} / {r['smolvlm_prefill_s']:.3f} | "
              f"{r['transformers_decode_tok_s']:.1f} | {r['smolvlm_decode_tok_s']:.1f} | {r['speedup']:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
