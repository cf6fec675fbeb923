"""The large-model targets of issue #20 on SmolVLM-2.2B (random bf16 weights of the real config):
int4 peak memory and decode speed, and load time (ours packed bf16, ours int4) against transformers.

Not run in CI (a 4.5 GB checkpoint, minutes). Each measurement runs in its own subprocess, so peak
RSS (``ru_maxrss``: the whole process, interpreter and imports included) and load time are its own.
Decode (every engine; transformers' ``generate``): greedy on a 100-token text prompt, tokens/s =
K / (t(1 + K new) - t(1 new)), after a warm-up, no early stop. Peak RSS is taken after the
generation (and, for ours, one image tile), before a pass that reads every weight. Writes
``bench/BIG_MODEL.md``.

    .venv/bin/python bench/parity_full_size.py make 2.2B bench/.cache/2.2B/ckpt   # once (transformers, ~2 min)
    .venv/bin/python bench/big_model.py [--model 2.2B] [--new 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
REPORT = ROOT / "bench" / "BIG_MODEL.md"
GIB = 2**30
VISION_INT8 = "ours-int4+vision-int8"
ENGINES = ("transformers", "ours-bf16", "ours-int4", VISION_INT8)
FEATURES = CACHE / "big_model_bf16_features.pt"  # ours-bf16's features of one tile, for the int8 tower's error


def child(kind: str, part: str, ckpt: str, new: int) -> None:
    """``part="read"``: load, then one pass reading every weight (timed). ``part="run"``: load, then
    the generation (and for ours one image tile); peak RSS. Separate processes, so that the read
    pass (which maps every page of a lazily loaded file, the embedding table included) neither
    sets the other's peak nor reads pages a generation already brought in."""
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if kind == "transformers":
        import transformers

        model = transformers.AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.bfloat16)
    else:
        from smolvlm import SmolVLM

        quantize = "int4" if kind.startswith("ours-int4") else "none"
        model = SmolVLM.from_pretrained(ckpt, dtype=torch.bfloat16, quantize=quantize, pack="auto",
                                        quantize_vision=kind == VISION_INT8)
    load_s = time.perf_counter() - t0
    out = {"engine": kind, "load_s": load_s}
    if part == "read":
        # transformers maps the file lazily: its load reads almost nothing (0.37 GiB RSS at 2.2B).
        # The time until every weight has been read once is reported next to the load for every engine.
        t0 = time.perf_counter()
        if kind != "transformers":
            from smolvlm.model.packed import pack_pending

            pack_pending(model)  # packed layers read and pack their weight on first use: all of them now
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                for chunk in t.detach().reshape(-1).split(1 << 22):  # 4M values at a time: no whole fp32 copy
                    chunk.float().sum() if t.is_floating_point() else chunk.sum()
        print("RESULT " + json.dumps({"read_s": load_s + time.perf_counter() - t0}), flush=True)
        return
    ids = torch.randint(1000, 40000, (1, 100), generator=torch.Generator().manual_seed(0))
    if kind == "transformers":
        def run(n: int) -> None:
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=model.config.text_config.vocab_size + 1000, pad_token_id=0)
    else:
        from smolvlm.generation.generate import generate_ids

        run = lambda n: generate_ids(model, ids, max_new_tokens=n, eos_token_id=[])  # noqa: E731
    run(4)  # warm-up
    t0 = time.perf_counter(); run(1); t1 = time.perf_counter() - t0
    t0 = time.perf_counter(); run(1 + new); tk = time.perf_counter() - t0
    out["decode_tok_s"] = new / (tk - t1)
    if kind != "transformers":
        # One 384 px tile through the vision tower + connector (an image question's first step), kept
        # by ours-bf16 so that the int8 vision tower's features can be compared with the bf16 ones.
        g = torch.Generator().manual_seed(1)
        m = model.config.vision_config.image_size
        pv = (torch.rand(1, 1, 3, m, m, generator=g) * 2 - 1).to(torch.bfloat16)
        with torch.inference_mode():
            feats = model.get_image_features(pv).float()
        if kind == "ours-bf16":
            torch.save(feats, FEATURES)
        elif FEATURES.is_file():
            ref = torch.load(FEATURES)
            out["features_rel_err"] = ((feats - ref).norm() / ref.norm()).item()
            out["features_cos"] = torch.nn.functional.cosine_similarity(feats.flatten(), ref.flatten(), dim=0).item()
    # Peak RSS of load + generation (+ one tile)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    print("RESULT " + json.dumps(out), flush=True)


def run_child(kind: str, part: str, ckpt: Path, new: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", kind, "--part", part, "--ckpt", str(ckpt),
                        "--new", str(new)], capture_output=True, text=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"{kind} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads(lines[-1][len("RESULT "):])
    print(r, flush=True)
    return r


def cpu_flags() -> str:
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return " ".join(f for f in wanted if f in flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="2.2B")
    ap.add_argument("--new", type=int, default=32, help="decoded tokens timed")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: every engine run as an AVX2-only CPU (smolvlm.cpu.avx2_only_env: PyTorch, oneDNN and "
                         "MKL capped; smolvlm's choices follow)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma list of the engines to run (default all; the ratios need transformers)")
    ap.add_argument("--out", default=str(REPORT), help=f"the report (default {REPORT.relative_to(ROOT)})")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.part, args.ckpt, args.new)
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        ap.error(f"--engines: unknown {sorted(unknown)} (of {','.join(ENGINES)})")
    from smolvlm.cpu import AVX2_ONLY, avx2_only_env

    if args.isa == "avx2":  # the children inherit it
        os.environ.update(avx2_only_env())
    ckpt = CACHE / args.model / "ckpt"
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {ckpt}: build it with bench/parity_full_size.py make {args.model} {ckpt}")
    FEATURES.unlink(missing_ok=True)
    rows = [run_child(kind, "run", ckpt, args.new) | run_child(kind, "read", ckpt, args.new)
            for kind in ENGINES if kind in args.engines.split(",")]
    by = {r["engine"]: r for r in rows}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import torch

    lines = [f"# SmolVLM-{args.model}: load, int4 memory and decode (issue #20)", "",
             f"Regenerate: `.venv/bin/python bench/big_model.py --model {args.model} --new {args.new}"
             + (f" --isa {args.isa}" if args.isa != "native" else "")
             + (f" --engines {args.engines}" if args.engines != ",".join(ENGINES) else "")
             + (f" --out {args.out}" if Path(args.out).resolve() != REPORT else "") + "` "
             f"(checkpoint: `bench/parity_full_size.py make {args.model} bench/.cache/{args.model}/ckpt`).", "",
             f"Machine: {cpu}, 2 threads; CPU flags: {cpu_flags()}; torch {torch.__version__}"
             + ("; **run as an AVX2-only CPU** (`--isa avx2`: " + " ".join(f"{k}={v}" for k, v in AVX2_ONLY.items())
                + ", so PyTorch, oneDNN, MKL and smolvlm's choices take the AVX2-only paths; not an AVX2-only CPU's "
                "caches, memory or clocks)" if args.isa == "avx2" else "") + ". One run, each engine in "
             "its own process; random bf16 weights of the real config. Peak RSS is the process's `ru_maxrss` "
             "(interpreter and imports included) of a process that loads and generates (ours: and encodes one image tile). "
             "ours-bf16 is loaded as the CLI loads it (`pack=\"auto\"`); ours-int4 "
             "quantizes the text linears while reading (`lm_head` int8), the vision tower stays bf16; "
             f"{VISION_INT8} (`--quantize int4 --quantize-vision`) also reads the vision tower and connector into int8. "
             "Decode (every engine): greedy on a 100-token text prompt. Then each of ours encodes one random 384 px tile; \"features vs bf16\" "
             "compares those image features with ours-bf16's (relative error, cosine).", "",
             "\"Load + read\": another process loads, then reads every parameter and buffer once (what a first answer "
             "needs; transformers maps the file and reads the weights only then). ours-bf16's packed layers read and pack "
             "their weights on first use (`PackedLinear.later`): its pass packs them all (`packed.pack_pending`), then "
             "reads what is left (norms, embeddings, biases). Where smolvlm's bf16 GEMV runs (AVX-512 CPUs, AMX ones included, "
             "`upcast.text_gemv_pays`) only the vision tower is packed; the text linears are read from the file "
             "mapping as they are.", "",
             "| engine | load s | vs transformers | load + read s | vs transformers | peak RSS GiB | decode tok/s | features vs bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = by.get("transformers")
        vs = (lambda k: f"{r[k] / t[k]:.2f}x") if t else (lambda k: "-")
        dec = f"{r['decode_tok_s']:.1f}"
        feat = f"{r['features_rel_err']:.2%} / {r['features_cos']:.5f}" if "features_rel_err" in r else "-"
        lines.append(f"| {r['engine']} | {r['load_s']:.1f} | {vs('load_s')} | {r['read_s']:.1f} | "
                     f"{vs('read_s')} | {r['peak_rss_gib']:.2f} | {dec} | {feat} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
