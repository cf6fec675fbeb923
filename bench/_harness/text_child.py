"""Text-only decode on the real SmolLM2-135M backbone (the llama.cpp Q4_1 GGUF), our engine.

Our SmolVLM holds the GGUF's dequantized text weights (plus a 1-layer dummy vision tower that is
never run), in the requested dtype and quantization mode. Measures decode tokens/s the same way
as ``bench/llamacpp_decode.py`` (same prompt ids, same number of new tokens, greedy, no early
stop; with ``--compile-mode`` through the compiled decode step, its compile in the untimed warm-up) and,
for the agreement prompts, (a) its own free-running greedy continuation and (b) its
teacher-forced top-1 predictions along the reference's continuation (``spec["forced"]``, ours bf16
unquantized: one forward over prompt + reference, the argmax at each reference position). The
parent scores both against the reference. Prints ``RESULT {json}``.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from typing import Any

import torch

from smolvlm import SmolVLM, SmolVLMConfig, VisionConfig
from smolvlm.generation import compiled
from smolvlm.generation.generate import generate_ids
from smolvlm.quantization import quantize, quantized_modules
from smolvlm.weights.gguf import find_smollm2_gguf, read_gguf_text_model

from _harness.peer_common import COMPILED_SUFFIXES

AGREE_TOKENS = 32  # agree_checkpoint's (random weights); the GGUF text part takes spec["agree_new"]


def gguf_model(dtype: torch.dtype, mode: str) -> SmolVLM:
    tcfg, sd = read_gguf_text_model(find_smollm2_gguf())
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=64, patch_size=16)
    cfg = SmolVLMConfig(model_type="idefics3", vision_config=vision, scale_factor=2, image_token_id=0,
                        text_config=tcfg, tie_word_embeddings=tcfg.tie_word_embeddings)
    with torch.device("meta"):
        model = SmolVLM(cfg)
    g = torch.Generator().manual_seed(0)
    full = {k: (sd[k] if k in sd else torch.randn(v.shape, generator=g) * 0.02)
            for k, v in model.state_dict().items()}
    model.load_state_dict(full, strict=True, assign=True)
    model.tie_weights()
    model = model.to(dtype).eval()
    if mode == "none":
        return model.pack_for_inference(auto=True)  # as the CLI loads it (pack="auto", smolvlm.model.packed)
    return quantize(model, mode)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the text model + lm_head tensors (the dummy vision tower excluded), tied counted once."""
    from smolvlm.model.packed import PackedLinear

    packed = [m.packed for m in model.modules() if isinstance(m, PackedLinear)]  # not parameters
    seen, total = set(), sum(t.numel() * t.element_size() for t in packed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("model.vision_model") or name.startswith("model.connector") or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def teacher_forced(model: SmolVLM, prompt: list[int], continuation: list[int]) -> list[int]:
    """The model's argmax after ``prompt + continuation[:i]`` for every i: one causal forward, no cache."""
    ids = torch.tensor([prompt + continuation[:-1]])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:]  # (len(continuation), V)
    return logits.argmax(-1).tolist()


@torch.inference_mode()
def teacher_forced_compiled(model: SmolVLM, prompt: list[int], continuation: list[int]) -> list[int]:
    """``teacher_forced`` through the compiled decode step (the path ``--compile`` answers with): the
    prompt prefilled eagerly, then each reference token fed to the step, the argmax after each."""
    step, n = model.compiled_decode, len(prompt)
    slots = compiled.cache_slots(n + len(continuation))
    cache, mask = model.new_kv_cache(1, slots), torch.ones(1, slots, dtype=torch.long)
    out = model(input_ids=torch.tensor([prompt]), attention_mask=mask[:, :n], kv_cache=cache,
                input_pos=torch.arange(n), logits_to_keep=1)
    predicted = [int(out.logits[0, -1].argmax())]
    for i, tok in enumerate(continuation[:-1]):
        logits = step(torch.tensor([[tok]]), mask, torch.tensor([[n + i]]), torch.tensor([n + i]), cache)
        predicted.append(int(logits[0].argmax()))
    return predicted


def measure(dtype_name: str, mode: str, prompt_ids: list[int], agree_prompts: list[list[int]], n_new: int,
            threads: int | None, agree_new: int = AGREE_TOKENS, forced: list[list[int]] | None = None,
            compile_mode: str | None = None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    model = gguf_model(getattr(torch, dtype_name), mode)
    step = compiled.enable(model, mode=compile_mode) if compile_mode else None  # generation/compiled.py (--compile-mode)
    ids = torch.tensor([prompt_ids])
    run = lambda n: generate_ids(model, ids, max_new_tokens=n, eos_token_id=[])  # noqa: E731
    t0 = time.perf_counter()
    run(4)  # warm-up; with compile_mode this compiles the step's (1, 256-slot) bucket, not timed
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter(); run(1); t1 = time.perf_counter() - t0
    t0 = time.perf_counter(); out = run(1 + n_new); tk = time.perf_counter() - t0
    greedy = [generate_ids(model, torch.tensor([p]), max_new_tokens=agree_new, eos_token_id=[])[0, len(p):].tolist()
              for p in agree_prompts]
    forcing = teacher_forced_compiled if step is not None else teacher_forced
    predicted = [forcing(model, p, c) for p, c in zip(agree_prompts, forced)] if forced else None
    name = f"ours-{mode}" if mode != "none" else f"ours-{dtype_name}"
    if step is not None and step.problem:
        raise SystemExit(f"compiled decode did not run: {step.problem}")
    suffix = {m: s for s, m in COMPILED_SUFFIXES.items()}.get(compile_mode)
    return {"engine": name + (f"-{suffix}" if suffix else ""), "dtype": dtype_name, "mode": mode,
            "warmup_s": warm_s, "compiled_buckets": sorted(step.buckets) if step is not None else None,
            "decode_tok_s": n_new / (tk - t1), "prefill_tok_s": len(prompt_ids) / t1,
            "tokens": out[0, len(prompt_ids):].tolist(), "greedy": greedy, "forced": predicted,
            "weight_mb": weight_bytes(model) / 2**20,
            "quantized_modules": len(quantized_modules(model)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main(args: Any) -> None:
    spec = json.loads(args.spec)
    r = measure(args.dtype, args.quantize, spec["prompt"], spec["agree"], spec["n_new"], args.threads,
                spec.get("agree_new", AGREE_TOKENS), spec.get("forced"), compile_mode=args.compile_mode)
    print("RESULT " + json.dumps(r), flush=True)


def agree_checkpoint(ckpt: str, n_prompts: int = 3, prompt_len: int = 48) -> dict[str, Any]:
    """Greedy agreement on a random-weight VLM checkpoint (text-only prompts): fp32 reference vs
    bf16, int8 and int4 (bf16 activations). Random weights give near-uniform logits, so this is
    a harsh test; the GGUF backbone numbers are the meaningful ones."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1000, 40000, (1, prompt_len), generator=g) for _ in range(n_prompts)]
    out: dict[str, Any] = {}
    for label, dtype, mode in (("fp32", torch.float32, "none"), ("bf16", torch.bfloat16, "none"),
                               ("int8", torch.bfloat16, "int8"), ("int4", torch.bfloat16, "int4")):
        model = SmolVLM.from_pretrained(ckpt, dtype=dtype, quantize=mode)
        out[label] = {"greedy": [generate_ids(model, p, max_new_tokens=AGREE_TOKENS, eos_token_id=[])[0, prompt_len:].tolist()
                                 for p in prompts],
                      "weight_mb": sum(t.numel() * t.element_size() for t in
                                       {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()) / 2**20}
        del model
    return out


def agree_main(args: Any) -> None:
    print("RESULT " + json.dumps(agree_checkpoint(args.ckpt)), flush=True)
