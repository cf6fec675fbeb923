"""The fused eager decode step (``model/fused_decode.py``, ``kernels/decode_layers.cpp``).

No tolerance: the fused step runs the same kernels as the layer-by-layer forward and rounds its
elementwise steps as PyTorch's kernels do, so its hidden states, logits, KV cache writes and greedy
tokens must equal the layer-by-layer ones bit for bit, for every weight format it takes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smolvlm import SmolVLM, kernels
from smolvlm.generation.generate import generate_ids
from smolvlm.model import fused_decode
from smolvlm.model.kv_cache import KVCache
from smolvlm.model.packed import pack_linears, packing_available
from smolvlm.model.upcast import gemv_text_linears, text_gemv_pays, upcast_slow_bf16
from smolvlm.quantization import quantize
from tests.helpers import tiny_config

AVX2 = kernels._cpu_problem() is None
pytestmark = pytest.mark.skipif(not AVX2, reason=f"no CPU kernels on this machine: {kernels._cpu_problem()}")

# weight format -> (activation dtype, how the tiny model's text linears are held, own int GEMVs or PyTorch's)
FORMATS = {
    "bf16 GemvLinear": (torch.bfloat16, "gemv", True),
    "bf16 UpcastLinear": (torch.bfloat16, "upcast", True),
    "float32 GemvLinear": (torch.float32, "gemv", True),
    "int8 bf16": (torch.bfloat16, "int8", True),
    "int8 float32": (torch.float32, "int8", True),
    "int8 bf16 (PyTorch's kernel from 3 rows)": (torch.bfloat16, "int8", False),
    "int4 bf16 (smolvlm's kernel)": (torch.bfloat16, "int4", True),
    "int4 bf16 (PyTorch's kernel)": (torch.bfloat16, "int4", False),
    "int4 float32 (PyTorch's kernel)": (torch.float32, "int4", False),
    "float32 packed (oneDNN)": (torch.float32, "packed", True),
    "bf16 packed (oneDNN)": (torch.bfloat16, "packed", True),
}


def _run_kernels(monkeypatch, own_gemv: bool = True) -> None:
    """The kernels on, as on an AVX2 CPU (``own_gemv``) or as on AVX-512 (PyTorch's int GEMVs from 3 rows)."""
    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)
    monkeypatch.setitem(kernels._state, "gemv", None if own_gemv else "PyTorch's GEMVs, as on AVX-512")


def _model(dtype: torch.dtype, held: str) -> SmolVLM:
    torch.manual_seed(0)
    model = SmolVLM.from_config(tiny_config(), dtype=torch.float32).eval()
    with torch.no_grad():  # weights of a trained model's scale, so activations stay O(1) through the layers
        for p in model.parameters():
            p.mul_(3.0)
    model = model.to(dtype)
    if held == "gemv":
        assert gemv_text_linears(model, force=True)
    elif held == "upcast":
        assert upcast_slow_bf16(model, force=True)
    elif held in ("int8", "int4"):
        quantize(model, held)
    elif held == "packed":
        assert pack_linears(model)
    return model


def _cache(model: SmolVLM, dtype: torch.dtype, rows: int = 1) -> KVCache:
    return model.new_kv_cache(rows, 16, dtype=dtype)


def _kind(dtype: torch.dtype, held: str, own: bool, rows: int) -> int:
    """The decode_layers.cpp kind the layers' forward takes for ``rows`` rows (``fused_decode.KINDS``)."""
    if held == "int8":
        return 1 if own or rows <= 2 or dtype == torch.float32 else 6  # int8.OWN_ROWS, then PyTorch's
    return {"gemv": 0 if dtype == torch.bfloat16 else 5, "upcast": 0, "int4": 2 if own else 3, "packed": 4}[held]


def _two_caches(monkeypatch, fmt: str, cache_dtype: torch.dtype, lengths: list[int], seed: int):
    """A tiny model in weight format ``fmt``, two caches of ``len(lengths)`` rows holding the same random
    prompts (row r: ``lengths[r]`` tokens, written alone as the engine's prefill does) and the fused step
    over the first: (dtype, text model, step, fused cache, layer cache, generator)."""
    dtype, held, own = FORMATS[fmt]
    if held == "packed" and not packing_available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU (bf16 needs AVX-512 or AVX-NE-CONVERT)")
    _run_kernels(monkeypatch, own)
    model = _model(dtype, held)
    text = model.model.text_model
    gen = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    fused_cache, layer_cache = _cache(model, cache_dtype, rows), _cache(model, cache_dtype, rows)
    for r, n in enumerate(lengths):
        prompt = torch.randn(1, n, text.config.hidden_size, generator=gen).to(dtype)
        for cache in (fused_cache, layer_cache):
            text(prompt, kv_cache=cache.rows(r, r + 1), input_pos=torch.arange(n))
    step = fused_decode.plan(text, fused_cache)
    assert isinstance(step, fused_decode.FusedDecoder), step
    assert set(step.kinds) == {_kind(dtype, held, own, rows)}
    return dtype, text, step, fused_cache, layer_cache, gen


def _same_caches(a: KVCache, b: KVCache) -> None:
    for x, y in zip(a.k + a.v, b.k + b.v):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.inference_mode()
def test_the_fused_step_is_the_layer_by_layer_step_bit_for_bit(monkeypatch, fmt, cache_dtype):
    """One sequence, as ``generate`` steps it (``input_pos`` (1,), every slot up to the new one)."""
    dtype, text, step, fused_cache, layer_cache, gen = _two_caches(monkeypatch, fmt, cache_dtype, [5], seed=1)
    d = text.config.hidden_size
    for slot in range(5, 9):
        x = torch.randn(1, 1, d, generator=gen).to(dtype)
        position = torch.tensor([[slot]])
        want = text(x, torch.ones(1, slot + 1, dtype=torch.long), position, kv_cache=layer_cache,
                    input_pos=torch.tensor([slot]))
        got = step(x, position, slot)
        assert got.dtype == dtype and got.shape == (1, 1, d)
        assert torch.equal(got, want), f"slot {slot}: max diff {(got.float() - want.float()).abs().max()}"
        assert want.abs().max() > 0.1  # not a degenerate state
    _same_caches(fused_cache, layer_cache)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", list(FORMATS))
@torch.inference_mode()
def test_rows_at_their_own_slots_are_the_batched_forward_bit_for_bit(monkeypatch, fmt, cache_dtype):
    """Continuous batching's step: 3 rows, each at its own slot (prompts of 5, 2 and 7 tokens), as the engine
    calls ``TextModel.forward`` (``input_pos`` (B, 1), each row over its own slots up to the new one)."""
    lengths = [5, 2, 7]
    dtype, text, step, fused_cache, layer_cache, gen = _two_caches(monkeypatch, fmt, cache_dtype, lengths, seed=2)
    d = text.config.hidden_size
    for i in range(4):
        slots = torch.tensor(lengths)[:, None] + i  # (3, 1)
        x = torch.randn(3, 1, d, generator=gen).to(dtype)
        want = text(x, kv_cache=layer_cache, input_pos=slots)
        got = step(x, slots, slots[:, 0].tolist())
        assert got.dtype == dtype and got.shape == (3, 1, d)
        assert torch.equal(got, want), f"step {i}: max diff {(got.float() - want.float()).abs().max()}"
        assert want.abs().max() > 0.1
    _same_caches(fused_cache, layer_cache)


@pytest.mark.parametrize("fmt", ["bf16 GemvLinear", "int8 bf16", "int4 bf16 (smolvlm's kernel)", "float32 packed (oneDNN)"])
def test_generate_steps_through_it_with_the_same_tokens_left_padded_batches_too(monkeypatch, fmt):
    """``generate`` decodes every step after the first token through the fused step, at the step's slot: one
    sequence, a batch, and a left-padded batch (with its key mask over the cache slots); the tokens are
    those of the layer-by-layer forward."""
    dtype, held, own = FORMATS[fmt]
    _run_kernels(monkeypatch, own)
    model = _model(dtype, held)
    calls = []
    op = torch.ops.smolvlm.decode_layers
    monkeypatch.setattr(torch.ops.smolvlm, "decode_layers", lambda *a: calls.append((a[9], a[10] is not None)) or op(*a))
    one = torch.tensor([[5, 9, 11, 40, 7]])
    two = torch.tensor([[5, 9, 11, 40, 7], [0, 0, 12, 3, 8]])
    cases = [(one, None), (two, None), (two, torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))]
    for ids, mask in cases:
        calls.clear()
        fused = generate_ids(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
        rows, masked = ids.shape[0], mask is not None
        assert calls == [([k] * rows, masked) for k in range(5, 10)]  # each step after the first token, at its slot
        with monkeypatch.context() as m:
            m.setattr(SmolVLM, "fused_decoder", lambda self, cache: "off for this test")
            layered = generate_ids(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
        assert torch.equal(fused, layered)


def test_what_it_refuses_and_why(monkeypatch):
    _run_kernels(monkeypatch)
    plain = _model(torch.float32, "plain")
    text = plain.model.text_model
    with torch.inference_mode():
        assert "q_proj" in fused_decode.plan(text, _cache(plain, torch.float32))  # nn.Linear: PyTorch's GEMM
        biased = _model(torch.float32, "plain")
        biased.model.text_model.layers[0].self_attn.o_proj.bias = nn.Parameter(torch.ones(64))
        pack_linears(biased)
        assert "layer 0's o_proj" in fused_decode.plan(biased.model.text_model, _cache(biased, torch.float32))
        int8 = _model(torch.bfloat16, "int8")
        gemv = _model(torch.bfloat16, "gemv")  # bf16, 8 rows or more: F.linear (upcast.MIN_ROWS)
        assert "for 8 rows" in fused_decode.plan(gemv.model.text_model, _cache(gemv, torch.float32, rows=8))
        assert isinstance(fused_decode.plan(gemv.model.text_model, _cache(gemv, torch.float32, rows=7)),
                          fused_decode.FusedDecoder)
        fp16 = _model(torch.float16, "int8")
        assert "float16" in fused_decode.plan(fp16.model.text_model, _cache(fp16, torch.float32))
        wrapped = _model(torch.bfloat16, "int8")
        wrapped.model.text_model.layers[1].mlp.down_proj = nn.Sequential(wrapped.model.text_model.layers[1].mlp.down_proj)
        assert "layer 1's down_proj" in fused_decode.plan(wrapped.model.text_model, _cache(wrapped, torch.float32))
        monkeypatch.setitem(kernels._state, "use", "off for this test")
        assert "kernels do not run" in fused_decode.plan(int8.model.text_model, _cache(int8, torch.float32))
        assert isinstance(int8.fused_decoder(_cache(int8, torch.float32)), str)
    with torch.enable_grad():  # weights that need a gradient, grad mode on: the kernels have no backward
        monkeypatch.setitem(kernels._state, "use", None)
        gemv = _model(torch.bfloat16, "gemv")
        assert "q_proj" in fused_decode.plan(gemv.model.text_model, _cache(gemv, torch.float32))


def test_a_slot_outside_the_cache_is_refused_in_one_line(monkeypatch):
    _run_kernels(monkeypatch)
    model = _model(torch.bfloat16, "int8")
    with torch.inference_mode():
        step = model.fused_decoder(_cache(model, torch.float32))
        with pytest.raises(RuntimeError, match="slot 16 outside the cache's 16"):
            step(torch.tensor([[3]]), torch.tensor([[16]]), 16)
        rows = model.fused_decoder(_cache(model, torch.float32, rows=2))
        with pytest.raises(RuntimeError, match="one slot per row"):
            rows(torch.tensor([[3], [4]]), torch.tensor([[2], [3]]), [2])


@torch.inference_mode()
def test_on_amx_cpus_the_kernels_run_in_decode_only(monkeypatch):
    """On AMX CPUs (``kernels.ON_AMX``, decided here from this CPU's flags plus ``amx_tile``) smolvlm's kernels
    run in decode only: the fused step (with its decode attention and RMSNorm, which the layer-by-layer
    forward then runs too), the bf16/float32 GEMV of plain text linears (what ``pack="auto"`` leaves them as)
    and int8's GEMV for a row or two; images' and prompts' attention and wider products stay PyTorch's. A
    packed model (``pack=True``, and the server's batches) takes the step too, bit for bit that forward and
    its greedy tokens; with those kernels off (the policy before) it is not taken."""
    assert kernels.build() is None
    flags = kernels.cpu.flags() or frozenset()
    monkeypatch.setattr(kernels.cpu, "flags", lambda: frozenset(flags | {"amx_tile"}))
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert not kernels.prepare() and kernels.problem() == kernels.AMX
    assert not kernels.ready("gemv") and not kernels.ready("bf16_attention") and not kernels.ready("f32_attention")
    assert kernels.ready("float_gemv") and text_gemv_pays(torch.float32)
    dtype = torch.bfloat16 if packing_available(torch.bfloat16) else torch.float32
    assert text_gemv_pays(dtype)  # pack="auto" leaves the text linears plain: the GEMV's
    gemv = _model(dtype, "gemv")
    assert set(fused_decode.plan(gemv.model.text_model, _cache(gemv, dtype)).kinds) == {_kind(dtype, "gemv", True, 1)}
    model = _model(dtype, "packed")
    text = model.model.text_model
    gen = torch.Generator().manual_seed(3)
    fused_cache, layer_cache = _cache(model, dtype), _cache(model, dtype)
    prompt = torch.randn(1, 5, text.config.hidden_size, generator=gen).to(dtype)
    for cache in (fused_cache, layer_cache):
        text(prompt, kv_cache=cache, input_pos=torch.arange(5))
    step = fused_decode.plan(text, fused_cache)
    assert isinstance(step, fused_decode.FusedDecoder) and set(step.kinds) == {fused_decode.KINDS["packed"]}
    for slot in range(5, 8):
        x = torch.randn(1, 1, text.config.hidden_size, generator=gen).to(dtype)
        want = text(x, torch.ones(1, slot + 1, dtype=torch.long), torch.tensor([[slot]]), kv_cache=layer_cache,
                    input_pos=torch.tensor([slot]))
        assert torch.equal(step(x, torch.tensor([[slot]]), slot), want)
    _same_caches(fused_cache, layer_cache)
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    fused = generate_ids(model, ids, max_new_tokens=6, eos_token_id=[])
    with monkeypatch.context() as m:
        m.setattr(SmolVLM, "fused_decoder", lambda self, cache: "off for this test")
        assert torch.equal(generate_ids(model, ids, max_new_tokens=6, eos_token_id=[]), fused)
    int8 = _model(torch.bfloat16, "int8")  # one row: smolvlm's int8 GEMV (PyTorch's has no AMX code); three: PyTorch's
    for rows, kind in ((1, "int8"), (3, "int8_torch")):
        assert set(fused_decode.plan(int8.model.text_model, _cache(int8, dtype, rows)).kinds) == {fused_decode.KINDS[kind]}
    monkeypatch.setitem(kernels._state, "use", "off: the old AMX policy")
    assert not any(kernels.ready(kind) for kind in kernels.ON_AMX)
    assert "AMX" in fused_decode.plan(text, _cache(model, dtype))
