"""Side-by-side benchmark: smolvlm vs transformers and OpenVINO (VLM) and vs llama.cpp (text decode). Writes
bench/RESULTS.md and bench/results.png.

Every measurement runs in a fresh subprocess per engine (so peak RSS, ``ru_maxrss``, is that
engine's own), engines alternate within each repetition (same machine load), warm-up is excluded
inside each child, and the tables report the median and min-max over repetitions plus the ratio of
medians. Checkpoints: random-weight bf16 checkpoints of the real configs built by
bench/parity_full_size.py in bench/.cache/<model>/ckpt; processor files from shared/reference.
Text decode: the real SmolLM2-135M Q4_1 GGUF, ours (bf16, int8, int4; fp32 as the agreement
reference) vs llama-cpp-python in bench/.cache/llama-venv (n_threads=2) on that file and on its Q8_0 copy made by
llama.cpp's own quantizer (bench/llamacpp_requantize.py; offline there is no other SmolLM2 GGUF).
OpenVINO (optimum-intel, engines openvino and openvino-int8) runs from its own bench-only venv and
exports, made by `bash bench/setup_openvino.sh [MODEL]`; run.py skips it, saying so, where they are missing.
llama.cpp's multimodal pipeline (llama-cpp-python + libmtmd, engines llama.cpp and llama.cpp-q8_0) runs from
bench/.cache/llama-venv on GGUF conversions of the same checkpoint, made by `bash bench/setup_llamacpp_vlm.sh [MODEL]`;
skipped the same way where they are missing.

    .venv/bin/python bench/run.py                                  # 256M, fp32+bf16, 3 reps
    .venv/bin/python bench/run.py --models 256M,500M,2.2B --dtypes bfloat16 --reps 2
    .venv/bin/python bench/run.py --quick                          # 1 rep, smaller workloads
    .venv/bin/python bench/run.py --engines ours,openvino          # a subset of the VLM engines
    .venv/bin/python bench/run.py --out bench/RESULTS-avx2.md      # another CPU kind: its own report
    .venv/bin/python bench/run.py --isa avx2 --out bench/RESULTS-avx2-capped.md   # run as an AVX2-only CPU

``--isa avx2`` runs ours and transformers with PyTorch, oneDNN and MKL capped at AVX2 (``smolvlm.cpu.avx2_only_env``: its own Inductor cache too;
smolvlm's kernel choices follow PyTorch's level) and llama.cpp from an AVX2-only build
(``bash bench/setup_llamacpp.sh avx2``); OpenVINO is left out: its release CPU plugin cannot be capped (under
``ONEDNN_MAX_CPU_ISA=AVX2`` it still reports BF16; its own ``OV_CPU_MAX_ISA`` exists in debug builds only).
Not an AVX2-only CPU: its caches, memory and clocks stay this one's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
CACHE = ROOT / "bench" / ".cache"
REFERENCE = Path(os.environ.get("SMOLVLM_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))
MODELS = {"256M": "SmolVLM-256M-Instruct", "500M": "SmolVLM-500M-Instruct", "2.2B": "SmolVLM-Instruct"}
LLAMA_PY = CACHE / "llama-venv" / "bin" / "python"  # --isa avx2: llama-venv-avx2's (main)
OV_PY = CACHE / "openvino-venv" / "bin" / "python"
OV_CHILD = ROOT / "bench" / "_harness" / "openvino_child.py"
OV_EXPORTS = {"openvino": "ov-fp", "openvino-int8": "ov-int8"}  # engine -> bench/.cache/<model>/<export>
LLAMA_VLM_CHILD = ROOT / "bench" / "_harness" / "llamacpp_vlm_child.py"
# engine -> text GGUF per dtype, in bench/.cache/<model>/llamacpp/ (float32 falls back to bf16 where no f32 one exists)
LLAMA_TEXT = {"llama.cpp": {"bfloat16": "text-bf16.gguf", "float32": "text-f32.gguf"},
              "llama.cpp-q8_0": {"bfloat16": "text-q8_0.gguf", "float32": "text-q8_0.gguf"}}
LLAMA_MMPROJ = {"bfloat16": "mmproj-bf16.gguf", "float32": "mmproj-f32.gguf"}
from _harness.peer_common import (COMPILED_ENGINES, COMPILED_SUFFIXES, KERNEL_ENGINES,  # noqa: E402 - after sys.path
                                  KERNEL_SUFFIXES)
from smolvlm.cpu import AVX2_ONLY, avx2_only_env  # noqa: E402

VLM_ENGINES = ["ours", "transformers", *OV_EXPORTS, *LLAMA_TEXT]
RAW = CACHE / "run_results.json"  # the raw rows behind bench/RESULTS.md (--out picks another report)


def outputs(out: str) -> tuple[Path, Path, Path]:
    """--out bench/RESULTS-avx2.md -> (that file, bench/results-avx2.png, bench/.cache/run_results-avx2.json):
    one report per machine kind, each with its own raw rows, so --append never mixes two CPUs."""
    md = Path(out).resolve()
    tag = md.stem[len("RESULTS"):] if md.stem.startswith("RESULTS") else "-" + md.stem
    return md, md.with_name(f"results{tag}.png"), RAW.with_name(f"run_results{tag}.json")
TEXT = ("Here is a short passage about the history of astronomy. Early observers tracked the motion of the "
        "planets against the fixed stars, built calendars from the cycles of the Sun and the Moon, and later "
        "used telescopes to discover moons, rings and distant galaxies. Please summarise it in a few sentences.")
AGREE = ["What is the capital of France?", "Write a haiku about the sea.",
         "Explain in two sentences why the sky is blue."]


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def child(cmd: list[str], label: str, kernels: str | None = None) -> dict | None:
    """Run one child; ``kernels``: its SMOLVLM_CPU_KERNELS (``KERNEL_ENGINES``), None: as this process has it."""
    t0 = time.perf_counter()
    env = None if kernels is None else {**os.environ, "SMOLVLM_CPU_KERNELS": kernels}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        print(f"  !! {label} failed (rc {p.returncode}):\n{p.stderr[-3000:]}", flush=True)
        return None
    print(f"  {label}: {time.perf_counter() - t0:.0f}s", flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def openvino_missing(model: str, engine: str) -> str | None:
    """Why the OpenVINO engine cannot run for this model (None: it can)."""
    export = CACHE / model / OV_EXPORTS[engine]
    if not OV_PY.is_file():
        return f"no venv {OV_PY.parent.parent.relative_to(ROOT)}"
    if not (export / "openvino_language_model.xml").is_file():
        return f"no export {export.relative_to(ROOT)}"
    return None


def llamacpp_files(model: str, engine: str, dtype: str) -> tuple[Path, Path]:
    """The (text GGUF, mmproj GGUF) the llama.cpp engine runs for this dtype (bf16 ones where no f32 one exists)."""
    d = CACHE / model / "llamacpp"
    text, mmproj = d / LLAMA_TEXT[engine][dtype], d / LLAMA_MMPROJ[dtype]
    if not text.is_file():
        text = d / LLAMA_TEXT[engine]["bfloat16"]
    if not mmproj.is_file():
        mmproj = d / LLAMA_MMPROJ["bfloat16"]
    return text, mmproj


def llamacpp_missing(model: str, engine: str) -> str | None:
    """Why the llama.cpp engine cannot run for this model (None: it can)."""
    if not LLAMA_PY.is_file():
        return f"no venv {LLAMA_PY.parent.parent.relative_to(ROOT)}"
    for f in llamacpp_files(model, engine, "bfloat16"):
        if not f.is_file():
            return f"no {f.relative_to(ROOT)}"
    return None


def compile_modes(args: argparse.Namespace) -> set[str]:
    """The compiled decode modes this run measures (``--compiled``, ``--compiled-max``)."""
    return {m for m, on in (("default", args.compiled), ("max-autotune", args.compiled_max)) if on}


def vlm_engines(args: argparse.Namespace, model: str) -> list[str]:
    """The engines to run for this model: --engines, less the OpenVINO / llama.cpp ones whose venv/files are missing."""
    engines, skipped = [], {"openvino": {}, "llamacpp": {}}
    for eng in args.engines or VLM_ENGINES:
        if eng in OV_EXPORTS and args.isa == "avx2":
            print(f"  -- skipping {eng}: OpenVINO's CPU plugin cannot be capped at AVX2 (see --isa)", flush=True)
        elif eng in OV_EXPORTS and (why := openvino_missing(model, eng)):
            skipped["openvino"][eng] = why
        elif eng in LLAMA_TEXT and (why := llamacpp_missing(model, eng)):
            skipped["llamacpp"][eng] = why
        else:
            engines.append(eng)
    for script, sk in (("setup_openvino.sh", skipped["openvino"]), ("setup_llamacpp_vlm.sh", skipped["llamacpp"])):
        if sk:
            print(f"  -- skipping {', '.join(sk)} for {model} ({'; '.join(dict.fromkeys(sk.values()))}): "
                  f"create with `bash bench/{script} {model}`", flush=True)
    return engines


def vlm_decode_ids(ref: Path, quick: bool) -> list[int]:
    """The 900 decode-prompt ids vlm_child.measure() draws (same seed, same draw order: the vision batch of
    n_tiles x 3 x M x M uniforms first), for the peers whose venv has no torch (llama.cpp)."""
    import torch

    m = json.loads((ref / "preprocessor_config.json").read_text())["max_image_size"]["longest_edge"]
    n_tiles = 2 if quick else 4  # vlm_child: (2, 16) if quick else (4, 32)
    g = torch.Generator().manual_seed(0)
    torch.rand(1, n_tiles, 3, m, m, generator=g)
    return torch.randint(1000, 40000, (1, 900), generator=g)[0].tolist()


def run_vlm(args: argparse.Namespace, rows: list[dict]) -> None:
    for model in args.models:
        ckpt, ref = CACHE / model / "ckpt", REFERENCE / MODELS[model]
        if not (ckpt / "config.json").is_file():
            raise SystemExit(f"{ckpt} missing: build it with .venv/bin/python bench/parity_full_size.py --models {model}")
        engines = vlm_engines(args, model) + [e for e, mode in COMPILED_ENGINES.items() if mode in compile_modes(args)]
        engines += list(KERNEL_ENGINES) if args.kernel_policies else []
        llama_spec = json.dumps({"prompt": vlm_decode_ids(ref, args.quick)}) if set(engines) & set(LLAMA_TEXT) else None
        for dtype in args.dtypes:
            for rep in range(args.reps):
                order = engines if rep % 2 == 0 else engines[::-1]  # alternate the order between repetitions
                for eng in order:
                    extra = ["--quick"] if args.quick else []
                    extra += ["--threads", str(args.threads)] if args.threads else []
                    if eng in OV_EXPORTS:  # its own venv's python, on its own export (never imports smolvlm)
                        cmd = [str(OV_PY), str(OV_CHILD), "--engine", eng, "--ckpt", str(CACHE / model / OV_EXPORTS[eng]),
                               "--ref", str(ref), "--dtype", dtype, *extra]
                    elif eng in LLAMA_TEXT:  # the llama venv's python (numpy only), on its GGUFs; the prompt ids from here
                        text_gguf, mmproj = llamacpp_files(model, eng, dtype)
                        cmd = [str(LLAMA_PY), str(LLAMA_VLM_CHILD), "--engine", eng, "--text-gguf", str(text_gguf),
                               "--mmproj", str(mmproj), "--dtype", dtype, "--spec", llama_spec,
                               "--threads", str(args.threads or 2), *(["--quick"] if args.quick else [])]
                    else:
                        cmd = me("--child", "vlm", "--engine", eng, "--ckpt", str(ckpt), "--ref", str(ref),
                                 "--dtype", dtype, *extra)
                    r = child(cmd, f"{model} {dtype} rep{rep} {eng}", KERNEL_ENGINES.get(eng))
                    if r:
                        rows.append({"model": model, "rep": rep, **r})
                        save_raw(args, rows=rows)


def text_prompts() -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(REFERENCE / MODELS["256M"] / "tokenizer.json"))
    chat = lambda s: tok.encode(f"<|im_start|>user\n{s}<|im_end|>\n<|im_start|>assistant\n").ids  # noqa: E731
    return {"prompt": chat(TEXT), "agree": [chat(s) for s in AGREE]}


def q8_0_gguf(q4_1: str) -> str | None:
    """The SmolLM2-135M GGUF requantized to Q8_0 by llama.cpp itself (bench/llamacpp_requantize.py),
    made once into bench/.cache; None (said on stderr) where llama.cpp's venv is missing or it fails."""
    out = CACHE / "smollm2-135m-q8_0-from-q4_1.gguf"
    if not out.is_file():
        if not LLAMA_PY.is_file():
            print(f"llama.cpp Q8_0 text row skipped: {LLAMA_PY} missing (bash bench/setup_llamacpp.sh)", file=sys.stderr)
            return None
        done = subprocess.run([str(LLAMA_PY), str(ROOT / "bench" / "llamacpp_requantize.py"), q4_1, str(out)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"llama.cpp Q8_0 text row skipped: requantizing failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
            return None
    return str(out)


AGREE_NEW = 200  # greedy tokens per agreement prompt (issue #20: agreement over 200 generated tokens)


def run_text(args: argparse.Namespace, rows: list[dict]) -> None:
    from smolvlm.weights.gguf import find_smollm2_gguf

    spec = {**text_prompts(), "n_new": 32 if args.quick else 64, "agree_new": AGREE_NEW}
    gguf = str(find_smollm2_gguf())
    threads = args.threads or 2
    # The agreement reference first: ours bf16, unquantized (the GGUF's weights, dequantized). Every
    # engine then runs free (its own greedy tokens) and teacher-forced along this continuation.
    ref = child(me("--child", "text", "--dtype", "bfloat16", "--quantize", "none", "--spec", json.dumps(spec),
                   "--threads", str(threads)), "text bf16 (agreement reference)")
    if ref:
        rows.append({**ref, "engine": "reference: ours-bfloat16"})
        spec["forced"] = ref["greedy"]
    r = child(me("--child", "text", "--dtype", "float32", "--quantize", "none", "--spec", json.dumps(spec),
                 "--threads", str(threads)), "text fp32")
    if r:
        rows.append(r)
    q8 = q8_0_gguf(gguf)
    engines = {
        "llama.cpp": [str(LLAMA_PY), str(ROOT / "bench" / "llamacpp_decode.py"),
                      json.dumps({"gguf": gguf, **spec, "threads": threads})],
        **({"llama.cpp-Q8_0": [str(LLAMA_PY), str(ROOT / "bench" / "llamacpp_decode.py"),
                               json.dumps({"gguf": q8, "engine": "llama.cpp-Q8_0", **spec, "threads": threads})]}
           if q8 else {}),
        **{f"ours-{m}": me("--child", "text", "--dtype", "bfloat16", "--quantize", m, "--spec", json.dumps(spec),
                           "--threads", str(threads)) for m in ("none", "int8", "int4")},
        **{f"ours-{m}-{suffix}": me("--child", "text", "--dtype", "bfloat16", "--quantize", m, "--compile-mode", cm,
                                    "--spec", json.dumps(spec), "--threads", str(threads))
           for suffix, cm in COMPILED_SUFFIXES.items() if cm in compile_modes(args) for m in ("none", "int8", "int4")},
        **{f"ours-{m}-{suffix}": me("--child", "text", "--dtype", "bfloat16", "--quantize", m, "--spec", json.dumps(spec),
                                    "--threads", str(threads))
           for suffix in (KERNEL_SUFFIXES if args.kernel_policies else ()) for m in ("none", "int8", "int4")},
    }
    names = list(engines)
    for rep in range(args.text_reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:  # rotate the order each rep
            suffix = name.split("-", 2)[-1]
            r = child(engines[name], f"text rep{rep} {name}", KERNEL_SUFFIXES.get(suffix))
            if r:  # the child names its row by its weights (ours-bfloat16, ours-int8...): add the kernel policy
                rows.append({"rep": rep, **r, **({"engine": f"{r['engine']}-{suffix}"} if suffix in KERNEL_SUFFIXES else {})})
                save_raw(args, text=rows)


def save_raw(args: argparse.Namespace, **parts: object) -> None:
    raw = outputs(args.out)[2]
    data = json.loads(raw.read_text()) if raw.is_file() else {}
    data.update(parts)
    raw.write_text(json.dumps(data))


CAPABILITY = "import torch; print(torch.backends.cpu.get_cpu_capability())"
OV_VERSIONS = ("from importlib.metadata import version as v; "
               "print(' / '.join(v(p) for p in ('openvino', 'optimum-intel', 'transformers')))")


def machine(isa: str) -> dict[str, str]:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    capped = {} if isa == "native" else {
        "run as": "an AVX2-only CPU: " + " ".join(f"{k}={v}" for k, v in AVX2_ONLY.items()) + " for ours and "
                  "transformers (PyTorch's level in a child: " + sh([sys.executable, "-c", CAPABILITY]) + "), "
                  "llama.cpp built with AVX2 + FMA + F16C only; OpenVINO left out (it cannot be capped)"}
    return {"CPU": cpu, "CPU flags (SIMD)": cpu_flags(), **capped, "cores (os.cpu_count)": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llama-cpp-python": sh([str(LLAMA_PY), "-c", "import llama_cpp; print(llama_cpp.__version__)"]),
            "openvino / optimum-intel / transformers (bench venv)": sh([str(OV_PY), "-c", OV_VERSIONS]),
            "commit": sh(["git", "rev-parse", "--short", "HEAD"]) + (" + uncommitted changes" if sh(["git", "status", "--porcelain", "src", "bench"]) else ""),
            "date": datetime.datetime.now().isoformat(timespec="minutes")}


def cpu_flags() -> str:
    """The SIMD flags that decide the kernels (AVX2-only vs AVX-512 BF16/AMX), from /proc/cpuinfo."""
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    return " ".join(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))) or "-"


def write_report(args: argparse.Namespace, data: dict) -> None:
    from _harness import report

    vlm, text, agree = data.get("rows", []), data.get("text", []), data.get("agree256")
    ov = [e for e in OV_EXPORTS if any(r["engine"] == e for r in vlm)]
    lc = [e for e in LLAMA_TEXT if any(r["engine"] == e for r in vlm)]
    lines = ["# Benchmarks: smolvlm vs transformers" + (" vs OpenVINO" if ov else "") + " vs llama.cpp (CPU)", "",
             f"Regenerate: `{' && '.join(data['commands'])}`" + (" (--quick: 2 vision tiles and 16 decode tokens per child instead of 4 and 32)" if args.quick else ""),
             "", "| machine | |", "|---|---|", *[f"| {k} | {v} |" for k, v in data["machine"].items()], "",
             "Method: each engine runs in its own subprocess (peak RSS = that process's `ru_maxrss`); engines "
             "alternate within every repetition; warm-up runs are excluded; CPU only, so results are "
             "materialised before the clock is read. Weights are random (bf16 checkpoints of the real configs, "
             "loaded in the dtype shown). Vision: a batch of 512/384 px tiles through vision encoder + connector. "
             "Prefill and decode: one greedy generation of 1+K tokens after 900 random text tokens, timestamped per "
             "token (ours: the token generator; transformers: a streamer); prefill = 900 / time to the first token, "
             "decode = K / (last token - first token), no early stop. TTFT: processor (chat template, "
             "image resize/tiling, tokenizer) + vision + prefill + first token, each engine with its own processor. "
             "Ours is loaded as the CLI loads it (`pack=\"auto\"`: oneDNN-packed text linears where packing is faster on this CPU).", ""]
    if ov:
        kv = next((r["openvino_compiled"].get("KV_CACHE_PRECISION") for r in vlm if r.get("openvino_compiled")), None)
        lines[-1:-1] = ["", "OpenVINO: optimum-intel `OVModelForVisualCausalLM` (bench-only venv, `bash bench/setup_openvino.sh`) "
                        "on an `optimum-cli export openvino` of the same checkpoint (openvino: its bf16 weights; openvino-int8: "
                        "`--weight-format int8`), INFERENCE_PRECISION_HINT = the dtype shown (OpenVINO's default KV cache "
                        f"precision, {kv} here), INFERENCE_NUM_THREADS = --threads, its processor from transformers 4.57 "
                        "(a streamer timestamps the tokens, as for transformers). Greedy agreement: the 32 greedy tokens "
                        "after the 900-token decode prompt, against ours in the same dtype (random weights: near-ties, so "
                        "bf16 rounding differences flip tokens early; fp32 is the exactness check)."]
    if lc:
        r0 = next(r for r in vlm if r["engine"] in LLAMA_TEXT)
        files = sorted({f"{r['engine']} {r['dtype']}: {r['gguf']['text']} + {r['gguf']['mmproj']}" for r in vlm
                        if r["engine"] in LLAMA_TEXT and r.get("gguf")})
        lines[-1:-1] = ["", "llama.cpp: llama-cpp-python's bindings to libllama + libmtmd (bench-only venv, `bash bench/setup_llamacpp.sh`; "
                        "GGUFs from llama.cpp's own `convert_hf_to_gguf.py` of the same checkpoint, `bash bench/setup_llamacpp_vlm.sh`), "
                        "the full multimodal pipeline: its chat template, its image processing and tiling (`mtmd_tokenize`), "
                        "one vision-encoder call per tile, then prefill (a separate vision batch has no counterpart, so vision "
                        "per tile is its encode time per tile inside the 512x512 TTFT). Same decode-prompt ids and images as the "
                        f"others; greedy agreement as for OpenVINO; \"decode after the 512x512 image\": K greedy tokens "
                        f"right after that TTFT (context = its prompt). GGUFs: {'; '.join(files)}. Child notes: {r0.get('notes', '-')}."]
    lines += ["## 1. VLM: ours vs transformers" + (" and " + ", ".join(ov + lc) if ov or lc else ""), ""]
    for model in dict.fromkeys(r["model"] for r in vlm):
        lines += report.vlm_table(vlm, model)
    if vlm:
        lines += ["## 2. Tile budget (opt-in `no_upscale=True`; ours only, default stays the reference)", "",
                  *report.budget_table(vlm)]
    if text:
        lines += ["## 3. Text decode on the real SmolLM2-135M backbone (Q4_1 GGUF)", "",
                  f"Same prompt ids ({len(text_prompts()['prompt'])} tokens), same number of new tokens, greedy, "
                  "n_threads=2 for llama.cpp; ours holds the GGUF's dequantized weights in the mode shown "
                  "(int8: weight-only, lm_head too; int4: weight-only, lm_head int8; bf16 activations). Agreement, on "
                  f"{len(AGREE)} chat prompts x {AGREE_NEW} greedy tokens, against ours bf16 unquantized (the GGUF's own "
                  "weights): free-running (each engine's own greedy tokens; one early difference changes the rest) and "
                  "teacher-forced (each engine predicts the next token along the reference's continuation: the "
                  "share it gets right).", "",
                  *report.text_table(text)]
    if agree:
        lines += ["## 4. Quantization agreement on the random-weight 256M config", "",
                  "3 random 48-token prompts, 32 greedy tokens; int8/int4 quantize the text decoder + lm_head.", "",
                  *report.agree256_table(agree)]
    lines += ["## 5. Targets and analysis", "", data.get("analysis", "(see the report of the benchmark engineer)"), ""]
    md, png, _ = outputs(args.out)
    md.write_text("\n".join(lines))
    report.plot(vlm, text, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="256M", help="comma list of 256M,500M,2.2B (default 256M)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--text-reps", type=int, default=None, help="repetitions of the text-decode table (default --reps)")
    ap.add_argument("--quick", action="store_true", help="fewer tiles/tokens per child, 1 repetition unless --reps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--engines", default=None,
                    help=f"comma list of VLM engines of {','.join(VLM_ENGINES)} (default: all; the OpenVINO ones "
                         "only where bench/setup_openvino.sh made their venv and export, the llama.cpp ones only where "
                         "bench/setup_llamacpp_vlm.sh made their GGUFs)")
    ap.add_argument("--compiled", action="store_true",
                    help="also run ours through the compiled decode step (smolvlm --compile): text rows "
                         "ours-{none,int8,int4}-compiled and the VLM engine ours-compiled (compile in the warm-up)")
    ap.add_argument("--compiled-max", action="store_true",
                    help="also run ours through the compiled decode step in mode max-autotune (smolvlm --compile-mode "
                         "max-autotune): text rows ours-{none,int8,int4}-compiled-max and the VLM engine ours-compiled-max")
    ap.add_argument("--kernel-policies", action="store_true",
                    help="also run ours with SMOLVLM_CPU_KERNELS=0 (none of smolvlm's kernels) and =1 (all of them): "
                         "the VLM engines ours-kernels-off and ours-kernels-all, text rows ours-{none,int8,int4}-kernels-"
                         "{off,all}; weighs the kernel policy of a CPU (kernels.prepare)")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: run as an AVX2-only CPU (see the module docstring); native (default): this CPU as it is")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: vlm,text,agree")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from its raw rows in bench/.cache")
    ap.add_argument("--out", default=None,
                    help="the report to write (default bench/RESULTS.md, with --isa avx2 bench/RESULTS-avx2-capped.md); bench/RESULTS-X.md keeps its own raw rows "
                         "(bench/.cache/run_results-X.json) and chart (bench/results-X.png): one report per CPU kind")
    ap.add_argument("--append", action="store_true",
                    help="add to the rows of the previous run instead of starting over (measure models in stages)")
    ap.add_argument("--analysis-file", default=None, help="markdown file pasted into section 5")
    # child mode (internal)
    ap.add_argument("--child", choices=["vlm", "text", "agree"], help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--compile-mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "vlm":
        from _harness import vlm_child
        return vlm_child.main(args)
    if args.child == "text":
        from _harness import text_child
        return text_child.main(args)
    if args.child == "agree":
        from _harness import text_child
        return text_child.agree_main(args)

    if args.isa == "avx2":  # the children inherit the cap; llama.cpp's build is its own
        global LLAMA_PY
        os.environ.update(avx2_only_env())
        LLAMA_PY = CACHE / "llama-venv-avx2" / "bin" / "python"
        if not LLAMA_PY.is_file():
            print(f"  -- {LLAMA_PY.parent.parent.relative_to(ROOT)} missing: make it with "
                  "`bash bench/setup_llamacpp.sh avx2`", flush=True)
    args.models = [m for m in args.models.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.engines = [e for e in (args.engines or "").split(",") if e] or None
    if args.engines and set(args.engines) - set(VLM_ENGINES):
        ap.error(f"--engines: unknown {sorted(set(args.engines) - set(VLM_ENGINES))} (of {','.join(VLM_ENGINES)})")
    args.out = args.out or ("bench/RESULTS-avx2-capped.md" if args.isa == "avx2" else "bench/RESULTS.md")
    md, _, raw = outputs(args.out)
    if args.append and not args.report_only and raw.is_file() \
            and ("run as" in json.loads(raw.read_text()).get("machine", {})) != (args.isa == "avx2"):
        ap.error(f"--append: {md.name}'s rows were measured {'as an AVX2-only CPU' if args.isa == 'native' else 'natively'}; "
                 f"this run is {'native' if args.isa == 'native' else '--isa avx2'}: one report per way of running")
    if args.append and not args.report_only and md.is_file() and not raw.is_file():
        ap.error(f"--append: {md.name} has no raw rows here ({raw} is missing: they stay on the machine that "
                 "measured them), so it would be rewritten with this run's rows alone; run without --append "
                 "to start a new report, or bring that file back")
    args.reps = args.reps or (1 if args.quick else 3)
    args.text_reps = args.text_reps or args.reps
    skip = set(args.skip.split(","))
    if not args.report_only:
        raw = outputs(args.out)[2]
        old = json.loads(raw.read_text()) if args.append and raw.is_file() else {}
        if raw.is_file() and not args.append:
            raw.unlink()
        commands = old.get("commands", []) + [".venv/bin/python bench/run.py " + " ".join(sys.argv[1:])]
        save_raw(args, commands=commands, machine=machine(args.isa))
        rows: list[dict] = [r for r in old.get("rows", [])  # keep what this run does not measure again
                            if "vlm" in skip or not (r.get("model") in args.models and r.get("dtype") in args.dtypes
                                                     and (args.engines is None or r.get("engine") in args.engines
                                                          or COMPILED_ENGINES.get(r.get("engine")) in compile_modes(args)
                                                          or (args.kernel_policies and r.get("engine") in KERNEL_ENGINES)))]
        text: list[dict] = old.get("text", []) if "text" in skip else []
        if "vlm" not in skip:
            run_vlm(args, rows)
        if "text" not in skip:
            run_text(args, text)
        if "agree" not in skip:
            r = child(me("--child", "agree", "--ckpt", str(CACHE / "256M" / "ckpt")), "agreement 256M")
            if r:
                save_raw(args, agree256=r)
    md, png, raw = outputs(args.out)
    if not raw.is_file():
        raise SystemExit(f"{raw} missing: no run has measured rows for {md.name} on this machine yet "
                         "(run without --report-only first)")
    data = json.loads(raw.read_text())
    if args.analysis_file:  # kept with the raw rows, so a later --append or --report-only keeps section 5
        data["analysis"] = Path(args.analysis_file).read_text()
        save_raw(args, analysis=data["analysis"])
    write_report(args, data)
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
