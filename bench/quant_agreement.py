"""Greedy agreement of ``--quantize int8|int4`` with the unquantized model (issue #16).

Two models, each against itself unquantized in the same dtype:

* the built-in default model (SmolLM2-135M Q4_1 GGUF + merged LoRA + our vision tower): the README
  question on examples/shapes.png, two synthetic shape scenes, three text-only prompts;
* the plain SmolLM2-135M-Instruct GGUF backbone (text only, its own ChatML), four prompts.

Modes: ``int8``, ``int4`` (what ``--quantize int4`` does: ``quantize`` picks the group size),
``int4, lm_head float`` (the same without quantizing the head) and ``int4 g32 (forced)``, the
pre-fix behaviour: group 32 without the on-grid check. Per mode: the
share of the reference's first ``--tokens`` greedy tokens matched position by position (a
shorter output counts its missing positions as misses), whole outputs identical, outputs that
end (end-of-turn token) within ``--tokens``, the relative weight error of the quantized linears
(median over layers; lm_head apart), and for the default model the share of the merged LoRA
update that survives quantization (median over layers of <W_q - W_gguf, dW> / |dW|^2).

    .venv/bin/python bench/quant_agreement.py --out bench/QUANT_AGREEMENT.md

``--dtypes float32 bfloat16``: 7 min on 2 CPU cores (AVX2 only), 13 min while other jobs shared them.
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
IMAGE_PROMPTS = [("examples/shapes.png", "What colour is the triangle?")]
SCENE_SEEDS = (1, 3)  # smolvlm.synth.scenes.gen_shapes(random.Random(seed)): image + first question
TEXT_PROMPTS = ["What is the capital of France?", "Name three fruits.", "Write one sentence about the sea."]
BACKBONE_PROMPTS = ["What is the capital of France?", "Name three fruits.", "What is 2 + 3?",
                    "Write one sentence about the sea."]
MODES = ("int8", "int4", "int4, lm_head float", "int4 g32 (forced)")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
NOTES = """\
Reading it. `int4 g32 (forced)` is what `--quantize int4` did before the fix: the default model's
text weights are the Q4_1 GGUF (a 4-bit grid in blocks of 32) plus a merged LoRA smaller than half
a step, and group 32 rounds them back onto that grid: the smallest weight error of all, but the
LoRA is gone (`LoRA update kept`), so image answers are a bare `<end_of_utterance>` and text runs on
in ChatML turns. `quantize` now refuses group 32 there (`QuantizationError`) and picks 64, whose
groups straddle two GGUF blocks. On the plain backbone group 32 is lossless for the text linears
(weight error 0, no update to lose); what int4 changes there is lm_head (a Q6_K table in the
GGUF): compare the `int4, lm_head float` row."""


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return [f for f in CPU_FLAGS if f in flags]


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                platform.processor() or "?")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "?"


# -- models and prompts ---------------------------------------------------------------------------
def default_cases(processor: Any) -> list[tuple[str, dict[str, torch.Tensor]]]:
    from PIL import Image

    from smolvlm.synth.scenes import gen_shapes

    cases: list[tuple[str, list[Any] | None]] = [(q, [Image.open(REPO / p).convert("RGB")]) for p, q in IMAGE_PROMPTS]
    for seed in SCENE_SEEDS:
        images, texts, _ = gen_shapes(random.Random(seed))
        cases.append((f"{texts[0]['user']} (scene {seed})", images))
    cases += [(p, None) for p in TEXT_PROMPTS]
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    out = []
    for label, images in cases:
        question = label.rsplit(" (scene", 1)[0]
        inputs = processor.chat_inputs(question, images)
        out.append((label + (" [image]" if images else ""), {k: inputs[k] for k in keys if k in inputs}))
    return out


def backbone_model(default: Any) -> Any:
    """The default model's module tree with the GGUF's text weights (no LoRA) and its own 49152-row
    head; the 128 rows SmolLM2 lacks get the mean embedding (``grow_vocab``), as SmolVLM's init does."""
    from smolvlm.weights.gguf import find_smollm2_gguf, grow_vocab, read_gguf_text_model

    _, sd = read_gguf_text_model(find_smollm2_gguf())
    sd = grow_vocab(sd, default.config.text_config.vocab_size)
    model = copy.deepcopy(default)
    model.load_state_dict(sd, strict=False)
    return model.eval()


def backbone_cases(processor: Any) -> list[tuple[str, dict[str, torch.Tensor]]]:
    from smolvlm.training import replay

    template = replay.backbone_chat_template("gguf:smollm2")
    texts = replay.render_prompts(template, BACKBONE_PROMPTS)
    return [(p, {"input_ids": torch.tensor([processor.tokenizer.encode(t)])}) for p, t in zip(BACKBONE_PROMPTS, texts)]


def quantized(model: Any, mode: str) -> Any:
    from smolvlm.quantization import quantize, target_linears
    from smolvlm.quantization.int4 import Int4Linear

    q = copy.deepcopy(model)
    if mode == "int4, lm_head float":
        return quantize(q, "int4", names=[n for n in target_linears(q) if n != "lm_head"])
    if mode != "int4 g32 (forced)":
        return quantize(q, mode)
    for name in target_linears(q):  # the pre-fix quantize: group 32, no on-grid check
        parent, _, child = name.rpartition(".")
        setattr(q.get_submodule(parent) if parent else q, child, Int4Linear.from_linear(q.get_submodule(name), 32))
    q.quantization = {"mode": "int4", "group_size": 32}
    return q


# -- measurements ---------------------------------------------------------------------------------
@torch.no_grad()
def greedy(model: Any, cases: list[tuple[str, dict]], tokens: int, eos: list[int]) -> list[list[int]]:
    from smolvlm.generation.generate import generate_ids

    out = []
    for _, inputs in cases:
        n = inputs["input_ids"].shape[1]
        out.append(generate_ids(model, **inputs, max_new_tokens=tokens, eos_token_id=eos)[0, n:].tolist())
    return out


def token_share(ref: list[int], got: list[int]) -> float:
    n = len(ref)
    return sum(1 for i in range(n) if i < len(got) and got[i] == ref[i]) / n


@torch.no_grad()
def weight_errors(float_model: Any, q: Any) -> tuple[float, float]:
    """(median relative Frobenius error over the quantized text linears, lm_head's)."""
    from smolvlm.quantization import quantized_modules

    errs, head = [], float("nan")
    for name, m in quantized_modules(q).items():
        w = float_model.get_submodule(name).weight.float()
        e = ((m.dequantized_weight() - w).norm() / w.norm()).item()
        if name == "lm_head":
            head = e
        else:
            errs.append(e)
    return statistics.median(errs), head


@torch.no_grad()
def update_kept(float_model: Any, q: Any, gguf_sd: dict[str, torch.Tensor]) -> float:
    """Median over text linears of the share of (W - W_gguf), the merged LoRA, that W_q keeps."""
    from smolvlm.quantization import quantized_modules

    kept = []
    for name, m in quantized_modules(q).items():
        if name == "lm_head":
            continue
        w0 = gguf_sd[name + ".weight"].float()
        delta = float_model.get_submodule(name).weight.float() - w0
        kept.append((((m.dequantized_weight() - w0) * delta).sum() / (delta * delta).sum()).item())
    return statistics.median(kept)


def run_model(title: str, model: Any, cases: list, eos: list[int], tokens: int, tok: Any,
              gguf_sd: dict[str, torch.Tensor] | None) -> tuple[list[str], list[str]]:
    """Summary rows and per-prompt detail rows for one model in one dtype."""
    t0 = time.perf_counter()
    ref = greedy(model, cases, tokens, eos)
    dtype = str(model.dtype).removeprefix("torch.")
    rows = [f"| {title} | {dtype} | none | - | 1.000 | {len(cases)}/{len(cases)} | "
            f"{sum(r[-1] in eos for r in ref)}/{len(cases)} | 0 | - |"]
    answers = {"none": ref}
    for mode in MODES:
        q = quantized(model, mode)
        got = greedy(q, cases, tokens, eos)
        answers[mode] = got
        share = statistics.mean(token_share(r, g) for r, g in zip(ref, got))
        same = sum(r == g for r, g in zip(ref, got))
        ended = sum(bool(g) and g[-1] in eos for g in got)
        med, head = weight_errors(model, q)
        kept = f"{update_kept(model, q, gguf_sd):.2f}" if gguf_sd is not None else "-"
        rows.append(f"| {title} | {dtype} | {mode} | {q.quantization['group_size'] if mode != 'int8' else '-'} | "
                    f"{share:.3f} | {same}/{len(cases)} | {ended}/{len(cases)} | {med:.4f} (head {'float' if head != head else f'{head:.3f}'}) | {kept} |")
        print(rows[-1], flush=True)
        del q
    cell = lambda ids: tok.decode(ids).replace("\n", "\\n").replace("|", "\\|")[:70]  # noqa: E731
    detail = [f"| {title} | {dtype} | {label} | " + " | ".join(cell(answers[m][i]) for m in ("none", *MODES)) + " |"
              for i, (label, _) in enumerate(cases)]
    print(f"{title} {dtype}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows, detail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per prompt at most (default 32)")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    args = ap.parse_args()

    from smolvlm import SmolVLM, SmolVLMProcessor
    from smolvlm.weights.gguf import find_smollm2_gguf, read_gguf_text_model

    flags = cpu_flags()
    print(f"CPU: {cpu_name()}; flags: {' '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    processor = SmolVLMProcessor.from_pretrained("default")
    tok = processor.tokenizer
    vlm_cases, text_cases = default_cases(processor), backbone_cases(processor)
    _, gguf_sd = read_gguf_text_model(find_smollm2_gguf())
    summary, detail = [], []
    for dtype in args.dtypes:
        model = SmolVLM.from_pretrained("default", dtype=getattr(torch, dtype))
        eos = [tok.token_to_id("<end_of_utterance>")]
        rows, det = run_model("default model", model, vlm_cases, eos, args.tokens, tok, gguf_sd)
        summary += rows
        detail += det
        rows, det = run_model("SmolLM2 backbone", backbone_model(model), text_cases, [tok.token_to_id("<|im_end|>")],
                              args.tokens, tok, None)
        summary += rows
        detail += det
        del model
    report = "\n".join([
        "# Greedy agreement of quantized and unquantized models",
        "",
        f"Regenerate: `.venv/bin/python bench/quant_agreement.py --tokens {args.tokens} --dtypes {' '.join(args.dtypes)}"
        f"{' --out ' + args.out if args.out else ''}` (see the script's docstring for the definitions).",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} threads; CPU flags: {' '.join(flags) or 'none'} "
        f"(of {', '.join(CPU_FLAGS)}); torch {torch.__version__}; commit {commit()}.",
        "",
        f"| model | dtype | mode | int4 group | identical tokens (first {args.tokens}) | identical outputs | "
        "outputs that end | weight rel. error, median | LoRA update kept |",
        "|---|---|---|---|---|---|---|---|---|",
        *summary,
        "",
        NOTES,
        "",
        "Outputs (first 70 characters, special tokens shown):",
        "",
        "| model | dtype | prompt | unquantized | " + " | ".join(MODES) + " |",
        "|---|---|---|---|" + "---|" * len(MODES),
        *detail,
        "",
    ])
    if args.out:
        Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
