"""QLoRA memory: LoRA on the float base vs QLoRA over an int8 / int4 base, real SmolVLM-256M shape.

Not run in CI. Each variant runs in its own subprocess (a fresh heap): the model is built with
``SmolVLM.from_config`` from shared/reference/SmolVLM-256M-Instruct/config.json (random weights,
seed 0, float32), then set up exactly as ``build_run`` does for a recipe (``qlora.quantize_base``
for ``model.quantize``, then ``build._configure``: LoRA r=8 on the 7 text projections, base frozen
with ``freeze: [model, lm_head]``), and trained ``--steps`` AdamW steps (``sft.train_step``) on one
fixed text-only batch (batch 1, ``--seq`` tokens, no image: the vision tower is resident but idle).

Reported per variant: trainable / frozen parameter bytes (frozen = float parameters + the quantized
layers' buffers), RSS after setup (float weights freed, ``malloc_trim``), peak RSS during the training
steps (the kernel's high-water mark reset after setup via ``/proc/self/clear_refs``), the process's
lifetime peak (``ru_maxrss``: it includes the float model every variant is built from), and the mean
step time. Writes bench/QLORA_MEMORY.md.

    .venv/bin/python bench/qlora_memory.py [--steps 3] [--seq 64]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("SMOLVLM_REFERENCE_DIR", ROOT.parent / "shared" / "reference")) / "SmolVLM-256M-Instruct"
MODES = ("none", "int8", "int4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2 ** 20


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child(mode: str, steps: int, seq: int) -> dict:
    import torch

    from smolvlm import SmolVLM, SmolVLMConfig
    from smolvlm.quantization import quantized_modules
    from smolvlm.training import build, optim, qlora, sft
    from smolvlm.training.recipe import FreezeRecipe, LoRARecipe, ModelRecipe, OptimRecipe, Recipe, ScheduleRecipe

    rss0 = _status_kib("VmRSS")
    cfg = SmolVLMConfig.from_dict(json.loads((REF / "config.json").read_text()))
    torch.manual_seed(0)
    model = SmolVLM.from_config(cfg, dtype=torch.float32)
    rss_float = _status_kib("VmRSS")
    recipe = Recipe(model=ModelRecipe(quantize=mode), lora=LoRARecipe(enabled=True, targets=TARGETS, r=8, alpha=8.0),
                    freeze=FreezeRecipe(freeze=["model", "lm_head"]))
    vocab = cfg.text_config.vocab_size
    qlora.quantize_base(model, recipe, vocab)
    build._configure(model, recipe, vocab)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    quant = quantized_modules(model)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    trainable = nbytes(p for p in model.parameters() if p.requires_grad)
    frozen_float = nbytes(p for p in model.parameters() if not p.requires_grad)
    quant_buffers = nbytes(b for m in quant.values() for b in m.buffers())
    rss_setup = _status_kib("VmRSS")

    opt = optim.build_optimizer(model, OptimRecipe(lr=1e-4))
    sched = optim.build_scheduler(opt, ScheduleRecipe(kind="constant"), steps)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 49000, (1, seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    peak_setup = _status_kib("VmHWM")  # read before the reset (ru_maxrss is the same counter)
    reset = _reset_peak()
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(sft.train_step(model, [batch], opt, sched, grad_clip=1.0)["loss"])
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "quantized_layers": len(quant), "trainable_bytes": trainable,
            "frozen_float_bytes": frozen_float, "quantized_bytes": quant_buffers,
            "rss_start_kib": rss0, "rss_float_model_kib": rss_float, "rss_setup_kib": rss_setup,
            "peak_setup_kib": peak_setup, "peak_train_kib": _status_kib("VmHWM") if reset else None,
            "peak_lifetime_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if not reset else None,
            "step_s": min(times[1:]) if len(times) > 1 else times[0],
            "first_step_s": times[0], "losses": losses}


def cpu_info() -> tuple[str, str]:
    text = Path("/proc/cpuinfo").read_text()
    def get(key: str) -> str:
        return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith(key)), "?")
    return get("model name"), get("flags")


def table(rows: list[dict]) -> str:
    name = {"none": "LoRA, float32 base", "int8": "QLoRA, int8 base", "int4": "QLoRA, int4 base"}
    mib = lambda b: f"{b / MIB:,.1f}"  # noqa: E731
    kmib = lambda k: "n/a" if k is None else f"{k / 1024:,.0f}"  # noqa: E731
    out = ["| variant | quantized layers | trainable (LoRA) MiB | frozen float MiB | frozen quantized MiB "
           "| RSS after setup MiB | peak RSS in training MiB | peak RSS in setup MiB | s/step | loss first -> last |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {name[r['mode']]} | {r['quantized_layers']} | {mib(r['trainable_bytes'])} | "
                   f"{mib(r['frozen_float_bytes'])} | {mib(r['quantized_bytes'])} | {kmib(r['rss_setup_kib'])} | "
                   f"{kmib(r['peak_train_kib'])} | {kmib(r['peak_setup_kib'])} | {r['step_s']:.2f} | "
                   f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.steps, a.seq)), flush=True)
        return
    import torch

    model_name, flags = cpu_info()
    print(f"CPU: {model_name} ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"CPU flags: {flags}")
    rows = []
    for mode in MODES:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps), "--seq", str(a.seq)],
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            sys.exit(f"{mode} failed:\n{p.stderr[-4000:]}")
        rows.append(json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:]))
        print(f"{mode}: {time.perf_counter() - t0:.0f} s", flush=True)
    md = table(rows)
    print(md)
    cmd = f".venv/bin/python bench/qlora_memory.py --steps {a.steps} --seq {a.seq}"
    interesting = [f for f in flags.split() if f.startswith(("avx", "amx", "fma", "f16c", "sse4"))]
    float_rss = rows[0]["rss_float_model_kib"] / 1024
    setup_extra = {r["mode"]: (r["peak_setup_kib"] - r["rss_float_model_kib"]) / 1024 for r in rows}
    doc = f"""# QLoRA memory: LoRA on a float base vs QLoRA over int8 / int4

Command (from the repository root; each variant in its own subprocess):

    {cmd}

Model: the real SmolVLM-256M-Instruct shape (`shared/reference/SmolVLM-256M-Instruct/config.json`),
random weights (`SmolVLM.from_config`, seed 0, float32). Set up as `build_run` does: `model.quantize`
quantizes the text decoder's linears and lm_head (`qlora.quantize_base`; {rows[1]['quantized_layers']} layers),
then LoRA r=8 on q/k/v/o/gate/up/down of the text model with `freeze: [model, lm_head]`
(`build._configure`). Training:
AdamW (`sft.train_step`), {a.steps} steps on one fixed text-only batch, batch 1, {a.seq} tokens, no
image (the vision tower is resident, frozen and float in every variant). No gradient checkpointing.

Machine: {model_name}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python
{platform.python_version()}, torch {torch.__version__}. Relevant CPU flags: {' '.join(interesting) or 'none'}
(full list below). The machine was shared with other jobs: times are indicative only.

{md}

* **trainable / frozen MiB**: parameter (and, for the quantized layers, buffer) bytes. Frozen float
  in the QLoRA rows is what stays float: embeddings, norms, the vision tower and the connector.
* **RSS after setup**: the process after quantizing and injecting LoRA, freed float weights
  returned (`malloc_trim`); includes the Python / torch runtime (~{rows[0]['rss_start_kib'] / 1024:,.0f} MiB at start).
* **peak RSS in training**: the high-water mark over the {a.steps} training steps only (reset through
  `/proc/self/clear_refs` after setup): weights + LoRA + AdamW state + activations + transient buffers.
  QLoRA's backward rebuilds one layer's float32 weight at a time (`grad_x = grad_y @ W_dequant`), and
  at {a.seq} rows the forward dequantizes per call too (the int kernels take <= 8 rows); a weight
  above 8 MiB as float32 (lm_head: 113 MiB) is rebuilt in row blocks of <= 8 MiB. Part of the
  difference to "after setup" is glibc keeping freed heap memory (measured once for int4 with
  `MALLOC_MMAP_THRESHOLD_=65536`: ~160 MiB above setup instead of ~340, with much slower steps).
* **peak RSS in setup**: the high-water mark before training. Every variant is built as a float32
  model first (as `build_run` loads a checkpoint; ~{float_rss:,.0f} MiB RSS here) and quantized
  afterwards by `smolvlm.quantization.quantize` while the float weights are still resident: int8 swaps
  layer by layer (+{setup_extra['int8']:,.0f} MiB over the float model here), int4 builds and checks
  (`erased_update`) every layer before swapping any (+{setup_extra['int4']:,.0f} MiB). QLoRA saves memory
  while training, not while loading.
* s/step: the fastest of steps 2..{a.steps}; the 2 cores were shared with other jobs, so times are noisy.
  QLoRA pays for rebuilding every layer's float weight in forward and backward (it is cheap next to
  the matmuls at this size).

Full CPU flags: `{flags}`
"""
    (ROOT / "bench" / "QLORA_MEMORY.md").write_text(doc)
    print(f"wrote {ROOT / 'bench' / 'QLORA_MEMORY.md'}")


if __name__ == "__main__":
    main()
