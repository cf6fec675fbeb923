"""One engine, one model, one dtype, in its own process: every VLM metric once, warm-up excluded.

Prints ``RESULT {json}`` as its last line. The parent (bench/run.py) alternates engines and
repeats; this file never compares anything. CPU only, so no device sync is needed: every timed
call returns materialised tensors (greedy token ids / features) before the clock is read.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from _harness.peer_common import COMPILED_ENGINES, GREEDY_N, PROMPT_LEN, QUESTION, test_pixels, timed


def test_image(width: int, height: int) -> Image.Image:
    return Image.fromarray(test_pixels(width, height))


class Ours:
    def __init__(self, ckpt: Path, ref: Path, dtype: torch.dtype, quantize: str = "none") -> None:
        from smolvlm import SmolVLM
        from smolvlm.processing.processor import SmolVLMProcessor

        # pack="auto": what the CLI loads (oneDNN-packed text linears where they are faster, smolvlm.model.packed)
        self.model = SmolVLM.from_pretrained(ckpt, dtype=dtype, quantize=quantize, pack="auto")
        self.proc = SmolVLMProcessor.from_pretrained(ref)
        self.tile = self.proc.image_processor.config.max_image_size

    @torch.inference_mode()
    def vision(self, pv: torch.Tensor) -> torch.Tensor:  # pv (1, N, 3, M, M)
        return self.model.get_image_features(pv, torch.ones(pv.shape[0], pv.shape[1], *pv.shape[-2:], dtype=torch.long))

    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        from smolvlm.generation.generate import generate_ids

        return generate_ids(self.model, ids, max_new_tokens=n, eos_token_id=[])

    def token_times(self, ids: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
        """perf_counter() at each new token (first = after prefill), from the token generator; and the tokens."""
        from smolvlm.generation.generate import generate_tokens

        times, toks = [time.perf_counter()], []
        for tok in generate_tokens(self.model, ids, max_new_tokens=n, eos_token_id=[]):
            times.append(time.perf_counter())
            toks.append(tok)
        return times, [int(t[0]) for t in toks]

    def ttft(self, image: Image.Image, split: bool = True, **budget: Any) -> dict[str, Any]:
        from smolvlm.generation.generate import generate_ids
        from smolvlm.generation.pixels import pixel_dtype

        def run() -> torch.Tensor:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            text = self.proc.apply_chat_template(msgs, add_generation_prompt=True)
            # pixels in the model's dtype with a bool mask, as smolvlm.stream (the CLI) and the server ask for
            inp = self.proc(text=text, images=[image], do_image_splitting=split, pixel_dtype=pixel_dtype(self.model),
                            **budget)
            tiles = inp["pixel_values"].shape[1]
            # popped, as stream() lets go of them: the pixels are freed once the images are encoded
            out = generate_ids(self.model, inp["input_ids"], inp["attention_mask"], inp.pop("pixel_values"),
                               inp.pop("pixel_attention_mask"), max_new_tokens=1, eos_token_id=[])
            return out, tiles

        t, (out, tiles) = timed(run)
        return {"s": t, "prompt_tokens": out.shape[1] - 1, "tiles": tiles}


class Theirs:
    def __init__(self, ckpt: Path, ref: Path, dtype: torch.dtype) -> None:
        import transformers

        self.model = transformers.AutoModelForImageTextToText.from_pretrained(
            ckpt, dtype=dtype, attn_implementation="sdpa").eval()
        self.proc = transformers.AutoProcessor.from_pretrained(ref)
        self.tile = self.proc.image_processor.max_image_size["longest_edge"]
        self.eos = self.model.config.text_config.vocab_size + 1000  # never produced: no early stop

    @torch.inference_mode()
    def vision(self, pv: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(pv.shape[0], pv.shape[1], *pv.shape[-2:], dtype=torch.bool)
        return self.model.model.get_image_features(pixel_values=pv, pixel_attention_mask=mask)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, eos_token_id=self.eos, pad_token_id=0)

    def token_times(self, ids: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
        """perf_counter() at each new token, from a streamer (generate calls put() once per step); and the tokens."""
        times, toks = [time.perf_counter()], []

        class Clock:
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if self.prompt_seen:
                    times.append(time.perf_counter())
                    toks.append(value)
                self.prompt_seen = True  # the first put() is the prompt itself

            def end(self) -> None:
                pass

        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, eos_token_id=self.eos, pad_token_id=0, streamer=Clock())
        return times, [int(t.reshape(-1)[0]) for t in toks]

    @torch.inference_mode()
    def ttft(self, image: Image.Image, split: bool = True) -> dict[str, Any]:
        def run() -> torch.Tensor:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            text = self.proc.apply_chat_template(msgs, add_generation_prompt=True)
            inp = self.proc(text=text, images=[image], return_tensors="pt", do_image_splitting=split)
            out = self.model.generate(**inp, max_new_tokens=1, do_sample=False)
            return out, inp["pixel_values"].shape[1]

        t, (out, tiles) = timed(run)
        return {"s": t, "prompt_tokens": out.shape[1] - 1, "tiles": tiles}


def measure(engine: str, ckpt: Path, ref: Path, dtype_name: str, quick: bool, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    ours = engine.startswith("ours")
    t_load, eng = timed(lambda: (Ours if ours else Theirs)(ckpt, ref, dtype))
    m = eng.tile
    n_tiles, k_new = (2, 16) if quick else (4, 32)
    g = torch.Generator().manual_seed(0)
    pv = (torch.rand(1, n_tiles, 3, m, m, generator=g) * 2 - 1).to(dtype)
    ids = torch.randint(1000, 40000, (1, PROMPT_LEN), generator=g)
    # warm-up: every code path once, small inputs
    eng.vision(pv[:, :1])
    eng.generate(ids[:, :32], 3)
    compile_mode = COMPILED_ENGINES.get(engine)
    if compile_mode:  # the decode step of smolvlm --compile(-mode): compile the timed run's bucket here
        from smolvlm.generation import compiled

        step = compiled.enable(eng.model, mode=compile_mode)
        t_warm, _ = timed(lambda: eng.generate(ids, 2))
        if step.problem:
            raise SystemExit(f"compiled decode did not run: {step.problem}")
    small = test_image(64, 48)
    eng.ttft(small, split=False)  # the pipeline once, one tile (vision kernels are warm already)
    r: dict[str, Any] = {"engine": engine, "dtype": dtype_name, "threads": torch.get_num_threads(), "load_s": t_load}
    if compile_mode:
        r["compile_warmup_s"], r["compiled_buckets"] = t_warm, sorted(step.buckets)
    t_vis, _ = timed(lambda: eng.vision(pv))
    r["vision_s_per_tile"] = t_vis / n_tiles
    # One generation of 1 + K tokens, timestamped per token: prefill = start -> first token,
    # decode = first -> last token (K single-token steps), so prefill noise cannot leak into decode.
    times, tokens = eng.token_times(ids, 1 + k_new)
    assert len(times) == k_new + 2, len(times)
    r["prefill_tok_s"] = PROMPT_LEN / (times[1] - times[0])
    r["decode_tok_s"] = k_new / (times[-1] - times[1])
    steps = [b - a for a, b in zip(times[1:], times[2:])]
    r["decode_step_ms_median"] = 1e3 * sorted(steps)[len(steps) // 2]
    r["decode_context"] = PROMPT_LEN
    for name, (w, h) in {"ttft_1536x1024": (1536, 1024), "ttft_512x512": (512, 512)}.items():
        res = eng.ttft(test_image(w, h))
        r[name] = res["s"]
        r[name + "_tiles"], r[name + "_tokens"] = res["tiles"], res["prompt_tokens"]
    if engine == "ours":  # the opt-in tile budget (ours only: the reference has no such option)
        res = eng.ttft(test_image(512, 512), no_upscale=True)
        r["ttft_512x512_no_upscale"] = res["s"]
        r["ttft_512x512_no_upscale_tiles"], r["ttft_512x512_no_upscale_tokens"] = res["tiles"], res["prompt_tokens"]
    if len(tokens) < GREEDY_N:  # --quick decodes fewer: one more (untimed) generation for the agreement ids
        tokens = eng.generate(ids, GREEDY_N)[0, PROMPT_LEN:].tolist()
    r["greedy_ids"] = tokens[:GREEDY_N]
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the probe's 256 MiB
    if ours:  # the decode step against this machine's read bandwidth, in the same process
        r["read_gb_s"] = read_bandwidth_gb_s()
        r["decode_weight_mb"] = decode_weight_bytes(eng.model) / 2**20
    return r


def read_bandwidth_gb_s(mib: int = 256, reps: int = 5) -> float:
    """Best of ``reps`` full reads (``sum``) of a ``mib``-MiB fp32 tensor: the floor a decode step that
    streams its weights cannot beat."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = min(timed(x.sum)[0] for _ in range(reps))
    return x.numel() * 4 / best / 1e9


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: the text decoder's and lm_head's weights (packed or not), tied once."""
    from smolvlm.model.packed import PackedLinear

    seen, total = set(), 0
    for name, m in model.named_modules():
        if not (name.startswith("model.text_model.") or name == "lm_head"):
            continue
        tensors = [m.packed] if isinstance(m, PackedLinear) else list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        for t in tensors:
            if id(t) not in seen and not name.endswith("embed_tokens"):  # the embedding is a row lookup
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def main(args: Any) -> None:
    r = measure(args.engine, Path(args.ckpt), Path(args.ref), args.dtype, args.quick, args.threads)
    print("RESULT " + json.dumps(r), flush=True)
