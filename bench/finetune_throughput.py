"""Fine-tuning throughput and memory: full, LoRA, QLoRA int8 / int4, and LoRA / full on 1 vs 2 processes.

    .venv/bin/python bench/finetune_throughput.py [--steps 6] [--out bench/FINETUNE_THROUGHPUT.md]

Each variant is a real ``smolvlm train`` run (its own process; ``torchrun --nproc-per-node 2`` for the
2-process rows) of the SmolVLM-256M-Instruct shape with random weights (config from
``shared/reference``), on the 12 example samples of ``examples/data/finetune.jsonl`` (one image each,
one or more question/answer turns), batch 2 (the global batch: with 2 processes, 1 sample per rank),
no gradient checkpointing, image splitting off (each image is one 512 px tile: 64 visual tokens).
With splitting on, the 256M processor upscales these images to 17 tiles each, and full fine-tuning
(which trains the vision tower, so its attention maps are kept for the backward) went past 24 GB
here and was killed: use ``train.gradient_checkpointing: true`` for that. samples/s: the median over the steps after the first (``metrics.jsonl``);
peak RSS: the largest process's high-water mark (``getrusage(RUSAGE_CHILDREN)`` in a fresh wrapper
process per variant, which covers torchrun's workers). One process uses every core (torch's threads); each of 2 processes uses one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("SMOLVLM_REFERENCE_DIR", REPO.parent / "shared" / "reference")) / "SmolVLM-256M-Instruct"
VENV = Path(sys.executable).parent

VARIANTS = [  # name, processes, recipe overrides
    ("full", 1, ["lora.enabled=false", "freeze.freeze=[]"]),
    ("LoRA r=8", 1, []),
    ("QLoRA int8", 1, ["model.quantize=int8"]),
    ("QLoRA int4", 1, ["model.quantize=int4"]),
    ("LoRA r=8, DDP", 2, ["train.distributed=ddp"]),
    ("full, DDP", 2, ["lora.enabled=false", "freeze.freeze=[]", "train.distributed=ddp"]),
    ("full, FSDP2", 2, ["lora.enabled=false", "freeze.freeze=[]", "train.distributed=fsdp"]),
]


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    keep = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?")
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(keep)}"


def make_checkpoint(dest: Path) -> Path:
    import torch

    from smolvlm.config import SmolVLMConfig
    from smolvlm.model.vlm import SmolVLM

    torch.manual_seed(0)
    model = SmolVLM.from_config(SmolVLMConfig.from_json_file(REF / "config.json"), dtype=torch.float32)
    model.save_pretrained(dest)
    for f in REF.iterdir():
        if f.is_file() and f.name != "config.json" and not (dest / f.name).exists():
            shutil.copyfile(f, dest / f.name)
    return dest


def run_variant(ckpt: Path, out: Path, procs: int, sets: list[str], steps: int) -> dict:
    base = [f"model.checkpoint={ckpt}", f"train.output_dir={out}", f"train.max_steps={steps}", "train.batch_size=2",
            "train.grad_accum=1", "train.gradient_checkpointing=false", "train.checkpoint_every=0",
            "train.progress=false", "schedule.warmup_steps=0", "data.max_length=2048", "data.image_splitting=false"]
    args = ["train", "--recipe", str(REPO / "configs" / "finetune-jsonl.yaml"),
            *(x for s in base + sets for x in ("--set", s))]
    env = {**os.environ}
    if procs == 1:
        cmd = [str(VENV / "smolvlm"), *args]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // procs))
        cmd = [str(VENV / "torchrun"), "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
               "--master-port", "29517", str(VENV / "smolvlm"), *args]
    # a fresh wrapper per variant: its RUSAGE_CHILDREN high-water mark covers this variant's processes only
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "sys.stderr.write('MAXRSS %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=1800)
    wall = time.perf_counter() - t0
    peak = int(run.stderr.rsplit("MAXRSS ", 1)[1].split()[0]) if "MAXRSS " in run.stderr else 0  # KiB
    if run.returncode != 0:
        raise SystemExit(f"{cmd}: exit {run.returncode}\n{run.stderr[-3000:]}")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    sps = [r["samples_per_s"] for r in recs[1:]] or [recs[0]["samples_per_s"]]
    return {"samples_per_s": statistics.median(sps), "peak_rss_mib": peak / 1024,
            "wall_s": wall, "loss": (recs[0]["loss"], recs[-1]["loss"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / "bench" / "FINETUNE_THROUGHPUT.md"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "smolvlm-256m-random")
        for name, procs, sets in VARIANTS:
            r = run_variant(ckpt, Path(tmp) / name.replace(" ", "_").replace(",", "").replace("=", ""), procs, sets,
                            args.steps)
            rows.append((name, procs, r))
            print(f"{name:16s} {procs}p  {r['samples_per_s']:.2f} samples/s  peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB  loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}",
                  flush=True)
    lines = ["# Fine-tuning throughput and memory (SmolVLM-256M shape, random weights)", "",
             "Command: `.venv/bin/python bench/finetune_throughput.py --steps %d`" % args.steps, "",
             f"Machine: {cpu_flags()}; torch {__import__('torch').__version__}.", "",
             "| variant | processes | samples/s (median) | peak RSS of the largest process (MiB) | loss first -> last |",
             "|---|---:|---:|---:|---|"]
    for name, procs, r in rows:
        rss = f"{r['peak_rss_mib']:,.0f}"
        lines.append(f"| {name} | {procs} | {r['samples_per_s']:.2f} | {rss} | {r['loss'][0]:.3f} -> {r['loss'][1]:.3f} |")
    lines += ["", __doc__.split("\n\n", 2)[2].strip()]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
