"""The OpenVINO peer (optimum-intel ``OVModelForVisualCausalLM``), one model, one dtype, in its own process.

Runs with the bench-only venv's python (bench/.cache/openvino-venv, made by
``bash bench/setup_openvino.sh``), never the project's: it must not import smolvlm. It measures what
``vlm_child.measure()`` measures for transformers, with the same inputs (same torch.Generator seed,
same synthetic images, same warm-up) and prints ``RESULT {json}`` with the same keys, plus
``greedy_ids`` (the 32 greedy tokens after the 900-token prompt; the parent compares them with ours).

    bench/.cache/openvino-venv/bin/python bench/_harness/openvino_child.py --engine openvino \\
        --ckpt bench/.cache/256M/ov-fp --ref ../shared/reference/SmolVLM-256M-Instruct --dtype bfloat16 --quick

``--ckpt`` is the OpenVINO export (ov-fp or ov-int8); the processor comes from ``--ref``. ``--dtype``
sets OpenVINO's INFERENCE_PRECISION_HINT (bfloat16 -> bf16, float32 -> f32): the export keeps the
checkpoint's bf16 weights (ov-fp) or int8 weights (ov-int8), and the hint is the compute precision.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from peer_common import GREEDY_N, PROMPT_LEN, QUESTION, test_pixels, timed  # run from this folder

PRECISION = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


def test_image(width: int, height: int) -> Image.Image:
    return Image.fromarray(test_pixels(width, height))


class OpenVINO:
    def __init__(self, export: Path, ref: Path, dtype_name: str, threads: int | None) -> None:
        import transformers
        from optimum.intel import OVModelForVisualCausalLM

        ov_config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": PRECISION[dtype_name]}
        if threads:
            ov_config["INFERENCE_NUM_THREADS"] = str(threads)
        self.model = OVModelForVisualCausalLM.from_pretrained(export, ov_config=ov_config, device="CPU")
        self.proc = transformers.AutoProcessor.from_pretrained(ref)
        self.tile = self.proc.image_processor.max_image_size["longest_edge"]
        self.eos = self.model.config.text_config.vocab_size + 1000  # never produced: no early stop

    def compiled(self) -> dict[str, str]:
        """What OpenVINO actually compiled the language model with (precision, threads)."""
        req = self.model.language_model.request
        req = req.get_compiled_model() if hasattr(req, "get_compiled_model") else req  # InferRequest -> CompiledModel
        keys = ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "KV_CACHE_PRECISION")
        out = {}
        for k in keys:
            try:
                v = req.get_property(k)
                out[k] = v.get_type_name() if hasattr(v, "get_type_name") else str(v)  # ov.Type -> "bf16"
            except Exception:  # noqa: BLE001 - a property this plugin version does not expose
                pass
        return out

    @torch.inference_mode()
    def vision(self, pv: torch.Tensor) -> Any:  # pv (1, N, 3, M, M): the vision encoder + connector model
        return self.model.get_vision_embeddings(pv.float(), input_ids=None)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, eos_token_id=self.eos, pad_token_id=0)

    def token_times(self, ids: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
        """perf_counter() at each new token, from a streamer (generate calls put() once per step)."""
        times, tokens = [time.perf_counter()], []

        class Clock:
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if self.prompt_seen:
                    times.append(time.perf_counter())
                    tokens.append(int(value.reshape(-1)[0]))
                self.prompt_seen = True  # the first put() is the prompt itself

            def end(self) -> None:
                pass

        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, eos_token_id=self.eos, pad_token_id=0, streamer=Clock())
        return times, tokens

    @torch.inference_mode()
    def ttft(self, image: Image.Image, split: bool = True) -> dict[str, Any]:
        def run() -> tuple[torch.Tensor, int]:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            text = self.proc.apply_chat_template(msgs, add_generation_prompt=True)
            inp = self.proc(text=text, images=[image], return_tensors="pt")
            out = self.model.generate(**inp, max_new_tokens=1, do_sample=False)
            return out, inp["pixel_values"].shape[1]

        # transformers 4.57's Idefics3Processor drops a do_image_splitting call argument ("not a valid
        # argument ... ignored"), so set it on the image processor for the call
        ip = self.proc.image_processor
        default, ip.do_image_splitting = ip.do_image_splitting, split
        try:
            t, (out, tiles) = timed(run)
        finally:
            ip.do_image_splitting = default
        return {"s": t, "prompt_tokens": out.shape[1] - 1, "tiles": tiles}


def measure(engine: str, export: Path, ref: Path, dtype_name: str, quick: bool, threads: int | None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    t_load, eng = timed(lambda: OpenVINO(export, ref, dtype_name, threads))
    m = eng.tile
    n_tiles, k_new = (2, 16) if quick else (4, 32)
    g = torch.Generator().manual_seed(0)  # the same inputs as vlm_child: same seed, same draw order
    pv = (torch.rand(1, n_tiles, 3, m, m, generator=g) * 2 - 1).to(dtype)
    ids = torch.randint(1000, 40000, (1, PROMPT_LEN), generator=g)
    # warm-up: every code path once, small inputs
    eng.vision(pv[:, :1])
    eng.generate(ids[:, :32], 3)
    eng.ttft(test_image(64, 48), split=False)
    r: dict[str, Any] = {"engine": engine, "dtype": dtype_name, "threads": threads or torch.get_num_threads(),
                         "load_s": t_load, "openvino_compiled": eng.compiled()}
    t_vis, _ = timed(lambda: eng.vision(pv))
    r["vision_s_per_tile"] = t_vis / n_tiles
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
    if len(tokens) < GREEDY_N:  # --quick decodes fewer: one more (untimed) generation for the agreement ids
        tokens = eng.generate(ids, GREEDY_N)[0, PROMPT_LEN:].tolist()
    r["greedy_ids"] = tokens[:GREEDY_N]
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default="vlm", help=argparse.SUPPRESS)  # accepted for symmetry with bench/run.py
    ap.add_argument("--engine", default="openvino")
    ap.add_argument("--ckpt", required=True, help="OpenVINO export folder (bench/.cache/<model>/ov-fp or ov-int8)")
    ap.add_argument("--ref", required=True, help="reference folder with the processor/tokenizer files")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(PRECISION))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    r = measure(args.engine, Path(args.ckpt), Path(args.ref), args.dtype, args.quick, args.threads)
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
