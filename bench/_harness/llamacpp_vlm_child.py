"""The llama.cpp peer (llama-cpp-python + libmtmd, the full multimodal pipeline), one model, one dtype, in its own process.

Runs with the bench-only venv's python (bench/.cache/llama-venv, made by ``bash bench/setup_llamacpp.sh``;
GGUFs by ``bash bench/setup_llamacpp_vlm.sh [MODEL]``), never the project's: it imports neither smolvlm
nor torch (that venv has numpy and jinja2 only). It measures what ``vlm_child.measure()`` measures, with
the same inputs, and prints ``RESULT {json}`` with the same keys:

- the 900 decode-prompt ids come from the parent in ``--spec`` (bench/run.py draws them with the same
  torch.Generator seed and draw order as vlm_child), as bench/llamacpp_decode.py gets its prompt;
- the images are vlm_child.test_image's (numpy rng seeded width*7+height, uint8 RGB), handed to mtmd as
  raw RGB (``mtmd_bitmap_init``: no PNG encode/decode, as the other engines get a decoded PIL image);
- the TTFT prompt is the GGUF's own chat template (the reference's, rendered with jinja2) with mtmd's
  media marker in place of ``<image>``; ``mtmd_tokenize`` then does llama.cpp's own image processing
  (resize to the longest edge, tiling, the idefics3 tile/row/global-image tokens), and every tile is an
  image chunk: encoded (``mtmd_encode_chunk``, timed: ``vision_s_per_tile``) and decoded into the KV cache
  (``mtmd_helper_decode_image_chunk``), text chunks through ``mtmd_helper_eval_chunk_single``; the first
  token is the argmax of the last logits.

    bench/.cache/llama-venv/bin/python bench/_harness/llamacpp_vlm_child.py --engine llama.cpp \\
        --text-gguf bench/.cache/256M/llamacpp/text-bf16.gguf --mmproj bench/.cache/256M/llamacpp/mmproj-bf16.gguf \\
        --dtype bfloat16 --spec '{"prompt": [...900 ids...]}' --threads 2 --quick

``--dtype`` picks the KV cache type (bfloat16: llama.cpp's default F16; float32: F32); the weights' type
is the GGUF's (the parent picks text-bf16/f32/q8_0 and mmproj-bf16/f32 by engine and dtype).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from peer_common import GREEDY_N, PROMPT_LEN, QUESTION, timed  # run from this folder
from peer_common import test_pixels as test_image  # (raw RGB bytes are what mtmd takes)

# the reference chat template's output for one image + QUESTION, should the GGUF carry no template
FALLBACK_PROMPT = "<|im_start|>User:<image>" + QUESTION + "<end_of_utterance>\nAssistant:"


class LlamaCppVLM:
    def __init__(self, text_gguf: Path, mmproj: Path, dtype_name: str, threads: int, n_ctx: int) -> None:
        import jinja2
        import llama_cpp
        from llama_cpp import Llama, mtmd_cpp

        self.lc, self.mtmd = llama_cpp, mtmd_cpp
        kv_type = llama_cpp.GGML_TYPE_F32 if dtype_name == "float32" else None  # None: llama.cpp's default F16
        kv = {"type_k": kv_type, "type_v": kv_type} if kv_type is not None else {}
        self.kv_cache = "f32" if kv_type is not None else "f16 (llama.cpp default)"
        self.llm = Llama(model_path=str(text_gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         flash_attn=True, logits_all=False, verbose=False, **kv)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # the vision encoder's attention too
        params.warmup = True  # mtmd's default: reserves the vision graph's buffers at load (no compute)
        self.mctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        if not self.mctx:
            raise RuntimeError(f"mtmd_init_from_file failed for {mmproj}")
        if not mtmd_cpp.mtmd_support_vision(self.mctx):
            raise RuntimeError(f"{mmproj} has no vision encoder")
        self.n_vocab = self.llm.n_vocab()
        self.no_callback = mtmd_cpp.mtmd_helper_post_decode_callback()  # a NULL function pointer (ctypes refuses None)
        self.n_ctx = n_ctx
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        tmpl = self.llm.metadata.get("tokenizer.chat_template")
        self.template = (jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(tmpl)
                         if isinstance(tmpl, str) and tmpl else None)
        # the template starts with <|im_start|> (the BOS token) itself: never let the tokenizer add one
        self.add_special = False

    # ---- text ----
    def reset(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def argmax(self) -> int:
        # the last output row of the context's logits buffer, no copy
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))))

    def token_times(self, ids: list[int], n: int) -> tuple[list[float], list[int]]:
        """perf_counter() at each new token (first = after prefill) and the tokens: n greedy tokens after ids."""
        self.reset()
        times = [time.perf_counter()]
        self.llm.eval(ids)
        tok = self.argmax()
        times.append(time.perf_counter())
        toks = [tok]
        for _ in range(n - 1):
            self.llm.eval([tok])
            tok = self.argmax()
            times.append(time.perf_counter())
            toks.append(tok)
        return times, toks

    def generate(self, ids: list[int], n: int) -> list[int]:
        return self.token_times(ids, n)[1]

    # ---- image + text ----
    def prompt_text(self) -> str:
        if self.template is None:
            text = FALLBACK_PROMPT
        else:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            text = self.template.render(messages=msgs, add_generation_prompt=True)
        return text.replace("<image>", self.marker, 1)

    def ttft(self, rgb: np.ndarray, max_image_chunks: int | None = None, decode_after: int = 0) -> dict[str, Any]:
        """Template + mtmd tokenize (image processing) + vision + prefill + first token, timed.

        max_image_chunks: stop after that many tiles (warm-up: every code path once, one tile).
        decode_after: then that many more greedy tokens, timed separately (decode after the image)."""
        m, lc = self.mtmd, self.lc
        h, w = rgb.shape[:2]
        t0 = time.perf_counter()
        self.reset()
        text = self.prompt_text().encode()
        bitmap = m.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        if not bitmap or not chunks:
            raise RuntimeError("mtmd_bitmap_init / mtmd_input_chunks_init failed")
        try:
            inp = m.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), self.add_special, True
            rc = m.mtmd_tokenize(self.mctx, chunks, ctypes.byref(inp), (m.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
            if rc != 0:
                raise RuntimeError(f"mtmd_tokenize failed: {rc}")
            n_prompt = int(m.mtmd_helper_get_n_tokens(chunks))
            if n_prompt + decode_after + 1 > self.n_ctx:
                raise RuntimeError(f"prompt {n_prompt} + {decode_after} tokens exceeds n_ctx {self.n_ctx}")
            n_chunks = m.mtmd_input_chunks_size(chunks)
            lctx, n_batch = self.llm._ctx.ctx, self.llm.n_batch
            n_past, tiles, t_encode, complete = 0, 0, 0.0, True
            for i in range(n_chunks):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                new_n_past = lc.llama_pos(n_past)
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    rc = m.mtmd_helper_eval_chunk_single(self.mctx, lctx, chunk, n_past, 0, n_batch,
                                                         i == n_chunks - 1, ctypes.byref(new_n_past))
                else:  # one tile (idefics3: every tile and the global image is its own chunk)
                    if max_image_chunks is not None and tiles >= max_image_chunks:
                        complete = False
                        break
                    tiles += 1
                    te = time.perf_counter()
                    rc = m.mtmd_encode_chunk(self.mctx, chunk)
                    t_encode += time.perf_counter() - te
                    if rc == 0:
                        rc = m.mtmd_helper_decode_image_chunk(self.mctx, lctx, chunk, m.mtmd_get_output_embd(self.mctx),
                                                              n_past, 0, n_batch, ctypes.byref(new_n_past), self.no_callback, None)
                if rc != 0:
                    raise RuntimeError(f"evaluating chunk {i} failed: {rc}")
                n_past = new_n_past.value
            tok = self.argmax() if complete else None
            t = time.perf_counter() - t0
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)
        out: dict[str, Any] = {"s": t, "prompt_tokens": n_prompt, "tiles": tiles, "encode_s": t_encode, "n_past": n_past}
        if decode_after and complete:
            self.llm.n_tokens = n_past  # Llama.eval continues at this position
            times = [time.perf_counter()]
            for _ in range(decode_after):
                self.llm.eval([tok])
                tok = self.argmax()
                times.append(time.perf_counter())
            out["decode_tok_s"] = decode_after / (times[-1] - times[0])
        return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    spec = json.loads(args.spec)
    ids = [int(x) for x in spec["prompt"]]
    assert len(ids) == PROMPT_LEN, len(ids)
    threads = args.threads or len(os.sched_getaffinity(0))
    k_new = 16 if args.quick else 32  # as vlm_child (its separate vision batch has no counterpart here)
    t_load, eng = timed(lambda: LlamaCppVLM(Path(args.text_gguf), Path(args.mmproj), args.dtype, threads,
                                            int(spec.get("n_ctx", 2048))))
    # warm-up: every code path once, small inputs
    eng.generate(ids[:32], 3)
    eng.ttft(test_image(64, 48), max_image_chunks=1)  # llama.cpp always tiles: only the first tile is run
    r: dict[str, Any] = {"engine": args.engine, "dtype": args.dtype, "threads": threads, "load_s": t_load}
    times, tokens = eng.token_times(ids, 1 + k_new)
    assert len(times) == k_new + 2, len(times)
    r["prefill_tok_s"] = PROMPT_LEN / (times[1] - times[0])
    r["decode_tok_s"] = k_new / (times[-1] - times[1])
    steps = [b - a for a, b in zip(times[1:], times[2:])]
    r["decode_step_ms_median"] = 1e3 * sorted(steps)[len(steps) // 2]
    r["decode_context"] = PROMPT_LEN
    for name, (w, h) in {"ttft_1536x1024": (1536, 1024), "ttft_512x512": (512, 512)}.items():
        res = eng.ttft(test_image(w, h), decode_after=k_new if name == "ttft_512x512" else 0)
        r[name] = res["s"]
        r[name + "_tiles"], r[name + "_tokens"] = res["tiles"], res["prompt_tokens"]
        r[name + "_encode_s"] = res["encode_s"]
        if name == "ttft_512x512":
            # each tile is encoded on its own (batch of 1), inside this TTFT
            r["vision_s_per_tile"] = res["encode_s"] / res["tiles"]
            r["decode_after_image_tok_s"] = res["decode_tok_s"]
            r["decode_after_image_context"] = res["n_past"]
    if len(tokens) < GREEDY_N:  # --quick decodes fewer: one more (untimed) generation for the agreement ids
        tokens = eng.generate(ids, GREEDY_N)
    r["greedy_ids"] = tokens[:GREEDY_N]
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["gguf"] = {"text": Path(args.text_gguf).name, "mmproj": Path(args.mmproj).name}
    r["notes"] = (f"llama-cpp-python {eng.lc.__version__} (libllama + libmtmd); text {Path(args.text_gguf).name}, "
                  f"mmproj {Path(args.mmproj).name}; flash attention on (Llama(flash_attn=True) and "
                  f"mtmd flash_attn_type=ENABLED); KV cache {eng.kv_cache}; n_threads=n_threads_batch={threads}, "
                  f"n_ctx={eng.n_ctx}, n_batch={eng.llm.n_batch}; GGUF mmap'd (its pages count in peak RSS); "
                  "load_s = Llama() + mtmd_init_from_file (mmap, graph reservation); vision_s_per_tile = mtmd_encode_chunk time per tile "
                  "(one tile per call) inside the 512x512 TTFT; image processing is llama.cpp's own (always tiles, "
                  "no do_image_splitting=False)")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default="vlm", help=argparse.SUPPRESS)  # accepted for symmetry with bench/run.py
    ap.add_argument("--engine", default="llama.cpp")
    ap.add_argument("--text-gguf", required=True, help="text model GGUF (bench/.cache/<model>/llamacpp/text-*.gguf)")
    ap.add_argument("--mmproj", required=True, help="mmproj GGUF (bench/.cache/<model>/llamacpp/mmproj-*.gguf)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--spec", required=True, help='JSON: {"prompt": [900 decode-prompt ids], "n_ctx": 2048}')
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    r = measure(args)
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
