"""Builders the tests share: tiny configs, tiny checkpoints, images and recipes.

Test modules import these from here (never from each other), so a test file can be moved or
deleted without breaking another.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from smolvlm import SmolVLM
from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.data.cauldron import DataError
from smolvlm.training.collate import IGNORE_INDEX

REF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "vocab.json", "merges.txt", "chat_template.json")


def tiny_config(model_type: str = "idefics3", tie: bool = False, dtype: str | None = None) -> SmolVLMConfig:
    return SmolVLMConfig(
        model_type=model_type,
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8),
        text_config=TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               rope_theta=100000.0, tie_word_embeddings=tie),
        image_token_id=299, scale_factor=2, tie_word_embeddings=tie, torch_dtype=dtype,
    )


def logits(model: SmolVLM) -> torch.Tensor:
    ids = torch.tensor([[5, 299, 299, 299, 299, 7, 8]])
    pv = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pv.to(model.dtype)).logits


MAX_POS = 1024


def build_tiny_checkpoint(dest: Path, ref_dir: Path, seed: int = 0) -> Path:
    import transformers  # the test oracle builds the checkpoint

    """Save a tiny random transformers Idefics3 model + the 256M tokenizer/template files into ``dest``."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=64, patch_size=8, initializer_range=0.2)
    text = dict(model_type="llama", vocab_size=49280, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_POS,
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, initializer_range=0.2)
    cfg = transformers.Idefics3Config(vision_config=vision, text_config=text, image_token_id=49190, scale_factor=2,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Idefics3ForConditionalGeneration._from_config(
        cfg, dtype=torch.float32, attn_implementation="sdpa")
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for name in REF_FILES + ("generation_config.json",):  # the published generation config: eos 49279, pad 2
        shutil.copy(ref_dir / name, dest / name)
    pre = json.loads((ref_dir / "preprocessor_config.json").read_text())
    pre["max_image_size"] = {"longest_edge": 64}
    pre["size"] = {"longest_edge": 128}
    (dest / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (dest / "processor_config.json").write_text(json.dumps({"image_seq_len": 16,
                                                            "processor_class": "Idefics3Processor"}))
    return dest


def make_image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=32, patch_size=8)


def tiny_recipe(ref: Path, out: Path, **train) -> dict:
    return {
        "model": {"text_backbone": "random", "text": TINY_TEXT, "vision": TINY_VISION, "scale_factor": 2,
                  "tokenizer": str(ref), "processor": {"do_image_splitting": False, "size": {"longest_edge": 32}}},
        "data": {"n_train": 5, "n_eval": 2, "seed": 0},
        "freeze": {"freeze": ["model.text_model", "lm_head"], "train": ["model.vision_model", "model.connector"]},
        "lora": {"enabled": True, "targets": [r"model\.text_model\..*(q_proj|v_proj|down_proj)"], "r": 4, "alpha": 8,
                 "dropout": 0.2},  # dropout: the RNG streams must be restored for an exact resume
        "optim": {"lr": 2e-3, "weight_decay": 0.01, "lr_groups": {"model.vision_model": 4e-3}},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {"output_dir": str(out), "max_steps": 6, "batch_size": 1, "grad_accum": 2, "eval_every": 3,
                  "checkpoint_every": 3, "keep_last": 3, "progress": False, **train},
    }


@contextlib.contextmanager
def live_server(app, timeout_s: float = 60.0):
    """Serve an ASGI app with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL.

    The socket is bound here (port 0), so there is no race for the port; the server always shuts
    down (lifespan shutdown included) when the block ends, and startup is bounded by ``timeout_s``."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


@contextlib.contextmanager
def serve_command(args: list[str], log: Path, env: dict[str, str] | None = None, timeout_s: float = 300.0):
    """``smolvlm serve ARGS --port 0`` in a subprocess; yields its base URL once ``/health`` answers 200.

    Output goes to ``log`` (shown when the server fails to start); startup is bounded by
    ``timeout_s`` (the default model loads a GGUF on a busy 2-core machine); the process is always
    stopped (terminate, then kill)."""
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    repo = Path(__file__).resolve().parents[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "smolvlm.cli.main", "serve", *args, "--port", "0"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=repo, env=env)

    def healthy(url: str) -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        deadline = time.monotonic() + timeout_s
        while True:
            found = re.findall(r"on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
            if found and healthy(found[0]):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"smolvlm serve did not start (exit {proc.poll()}):\n"
                                     f"{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield found[0]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


# -- the earlier label-alignment method (image-block lengths), kept as an independent oracle for
# training.data.align_by_utterance (tests/unit/test_data_sources.py) --------------------------------
def _segments(ids: Sequence[int], image_id: int) -> list[tuple[int, int]]:
    """[start, end) of the text runs between ``<image>`` tokens (m images -> m + 1 runs)."""
    segs, start = [], 0
    for i, t in enumerate(ids):
        if t == image_id:
            segs.append((start, i))
            start = i + 1
    segs.append((start, len(ids)))
    return segs


def align_labels_by_blocks(u_ids: Sequence[int], u_labels: Sequence[int], e_ids: Sequence[int], image_id: int,
                 block_lengths: Callable[[], list[int]] | None = None) -> list[int]:
    """Carry labels from the unexpanded ids (one ``<image>`` token per image) to the expanded ids.

    Text runs before the first and after the last image sit at known offsets (start / end). Runs in
    between need each image block's length, asked from ``block_lengths`` only in that case (images in
    later user turns). Every carried run is checked id by id."""
    segs = _segments(u_ids, image_id)
    m = len(segs) - 1
    extra = len(e_ids) - (len(u_ids) - m)  # total tokens of all image blocks
    starts: list[int | None] = [None] * len(segs)
    starts[0] = 0
    starts[-1] = len(e_ids) - (segs[-1][1] - segs[-1][0])
    needs_middle = any(u_labels[i] != IGNORE_INDEX for a, b in segs[1:-1] for i in range(a, b))
    if needs_middle:
        if block_lengths is None:
            raise DataError("assistant turns between images need the image block lengths")
        blocks = block_lengths()
        if len(blocks) != m or sum(blocks) != extra:
            raise DataError(f"image block lengths {blocks} do not add up to the {extra} expanded tokens")
        pos = 0
        for k, (a, b) in enumerate(segs):
            starts[k] = pos
            pos += (b - a) + (blocks[k] if k < m else 0)
    out = [IGNORE_INDEX] * len(e_ids)
    for k, (a, b) in enumerate(segs):
        s = starts[k]
        if s is None:
            continue  # only masked text here (checked by needs_middle)
        if list(e_ids[s: s + b - a]) != list(u_ids[a:b]):
            raise DataError(f"label alignment failed: text run {k} of the prompt is tokenized differently "
                            f"after image expansion (expected ids {list(u_ids[a:b])[:8]}... at {s})")
        out[s: s + b - a] = u_labels[a:b]
    return out


@contextlib.contextmanager
def watched_layer_reads(max_alive: int, skip: Callable[[str], bool] = lambda name: False):
    """Check that the loader's layer-by-layer reads (``weights.load._linear_reader``: quantizing at
    load; ``_later_reader``: packed layers reading their weight on first use) never hold more than
    ``max_alive`` earlier dense layers when the next one is read. Yields the names read, in order (``skip``: layers whose weights are not the reader's own,
    e.g. a tied head that reads the model's embedding table)."""
    import gc
    import weakref

    from smolvlm.weights import load as load_mod

    alive: list[weakref.ref] = []
    names: list[str] = []
    make_reader, make_later = load_mod._linear_reader, load_mod._later_reader

    def check(name):
        gc.collect()
        held = [r for r in alive if r() is not None]
        assert len(held) <= max_alive, f"{len(held)} dense layers were still alive when {name} was read"
        names.append(name)

    def watched(*args, **kwargs):
        read = make_reader(*args, **kwargs)

        def one(name):
            check(name)
            lin = read(name)
            if not skip(name):
                alive.append(weakref.ref(lin.weight))
            return lin
        return one

    def watched_later(*args, **kwargs):  # packing on first use: the weight is read when the layer first runs
        read_later = make_later(*args, **kwargs)

        def one(name):
            read, bias = read_later(name)

            def read_weight(*out):
                check(name)
                weight = read(*out)
                if not skip(name):
                    alive.append(weakref.ref(weight))
                return weight
            return read_weight, bias
        return one

    load_mod._linear_reader, load_mod._later_reader = watched, watched_later
    try:
        yield names
    finally:
        load_mod._linear_reader, load_mod._later_reader = make_reader, make_later


_RSS_GROWTH_CHILD = """
import json, sys, threading, time
# The peak of the *current* RSS over the statement, sampled every 0.5 ms: ru_maxrss would report
# the interpreter's import-time peak (~600 MiB, 380 above its settled RSS), hiding what is measured.
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
{setup}
base, high, done = rss(), [0], threading.Event()
def watch():
    while not done.is_set():
        high[0] = max(high[0], rss())
        time.sleep(0.0005)
t = threading.Thread(target=watch)
t.start()
result = {statement}
done.set()
t.join()
print(json.dumps({{"delta": max(high[0], rss()) - base, "result": {report}}}))
"""


def rss_growth(setup: str, statement: str, report: str = "None", *args: str) -> tuple[float, object]:
    """Run ``setup`` then ``result = statement`` in a fresh Python process; return the peak growth of
    its RSS during the statement (MiB) and ``report`` evaluated after it (JSON; may use ``result``,
    ``sys.argv[1:]`` are ``args``). A child process, so this process's allocations cannot hide or fake it."""
    import json
    import subprocess
    import sys

    code = _RSS_GROWTH_CHILD.format(setup=setup, statement=statement, report=report)
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["delta"] / 2**20, r["result"]


def vision_tower_with_and_without_kernel(monkeypatch, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``dtype`` vision tower (2 layers, 4 heads of 16) on a padded image, once through smolvlm's
    ``{kind}`` whole-sequence attention kernel (asserted to run once per layer) and once with it off
    (PyTorch's SDPA): (features with, features without)."""
    from smolvlm import kernels
    from smolvlm.model.vision import VisionTransformer

    torch.manual_seed(0)
    cfg = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=64, patch_size=8)
    tower = VisionTransformer(cfg).to(dtype).eval()
    pv = torch.randn(2, 3, 64, 64).to(dtype)
    patch_mask = torch.ones(2, 8, 8, dtype=torch.bool)
    patch_mask[1, 5:] = False
    patch_mask[1, :, 6:] = False
    calls = []
    op = getattr(torch.ops.smolvlm, kind)
    monkeypatch.setattr(torch.ops.smolvlm, kind, lambda *a: calls.append(1) or op(*a))
    with torch.inference_mode():
        got = tower(pv, patch_mask)
        assert len(calls) == cfg.num_hidden_layers
        monkeypatch.setitem(kernels._state, kind, "off for this test")
        want = tower(pv, patch_mask)
    assert len(calls) == cfg.num_hidden_layers
    return got, want


def stand_in_attention_kernel(monkeypatch, kind: str, record: Callable) -> list:
    """Make ``kind`` (``bf16_attention``, ``f32_attention``) the only kernel ``layers`` sees as ready and
    stand in for it with SDPA (the layout the kernels return: (B, T, Hq*hd)), so its dispatch is tested on
    any CPU. Returns the list each call appends ``record(q, is_causal)`` to."""
    import torch.nn.functional as F

    from smolvlm.model import layers

    calls: list = []

    def stand_in(q, k, v, mask, is_causal):
        calls.append(record(q, is_causal))
        b, h, t, d = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, h * d)

    monkeypatch.setattr(layers.kernels, "ready", lambda k="gemv": k == kind)
    monkeypatch.setattr(torch.ops.smolvlm, kind, stand_in, raising=False)
    return calls
