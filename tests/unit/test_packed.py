"""Packed (oneDNN-layout) linears for CPU inference against the plain model they replace.

bf16: packed and ``F.linear`` both run oneDNN bf16 kernels with fp32 accumulation; only the
blocking may differ, so logits are compared at 2e-2 (a few bf16 ulps at O(1) values) and greedy
tokens must be identical. fp32: summation order only, 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from smolvlm import SmolVLM
from smolvlm.generation.generate import generate_ids
from smolvlm.model.packed import (FUSED_GROUPS, DenseFused, PackedFused, PackedLinear, PackedPart, pack_linears,
                                  pack_targets, packing_available, packing_pays, unpack_linears)
from smolvlm.weights.safetensors_io import load_safetensors
from tests.helpers import logits, tiny_config, watched_layer_reads

FUSED_PARTS = {p for parts, _ in FUSED_GROUPS for p in parts}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def save_tiny(tmp_path: Path, tie: bool = False) -> Path:
    torch.manual_seed(0)
    d = tmp_path / ("tied" if tie else "ckpt")
    SmolVLM.from_config(tiny_config("smolvlm", tie=tie)).save_pretrained(d)
    return d


def greedy(model: SmolVLM) -> list[int]:
    ids = torch.tensor([[5, 299, 299, 299, 299, 7, 8]])
    pv = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    return generate_ids(model, ids, pixel_values=pv, max_new_tokens=8, eos_token_id=[])[0].tolist()


def cpu_packs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs ``dtype``; the branch it cannot run is skipped with the reason shown."""
    return packing_available(dtype)


def require_packing(dtype: torch.dtype) -> None:
    if not cpu_packs(dtype):
        pytest.skip(f"this CPU's oneDNN cannot pack {dtype} (bf16 needs AVX-512 BF16 or AMX); the unpacked "
                    f"fallback is tested by the *_where_packing_is_unavailable test instead")


def require_no_packing(dtype: torch.dtype) -> None:
    if cpu_packs(dtype):
        pytest.skip(f"this CPU packs {dtype}, so the fallback for CPUs that cannot does not run here; the packed "
                    f"path is tested instead")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_packed_model_matches_plain(tmp_path, dtype, tie):
    require_packing(dtype)
    d = save_tiny(tmp_path, tie)
    plain = SmolVLM.from_pretrained(d, dtype=dtype)
    packed = SmolVLM.from_pretrained(d, dtype=dtype, pack=True)
    names = pack_targets(plain)
    assert "lm_head" in names and any(n.endswith("self_attn.q_proj") for n in names)
    # q/k/v and gate/up are fused into one packed weight each; the parts stay at their names
    assert all(isinstance(packed.get_submodule(n), PackedPart if n.rpartition(".")[2] in FUSED_PARTS else PackedLinear)
               for n in names)
    attn = packed.model.text_model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, PackedFused) and attn.q_proj.fused is attn.qkv_proj
    assert isinstance(packed.model.text_model.layers[0].mlp.gate_up_proj, PackedFused)
    # the text decoder + head, and the vision tower in bf16 (its fused GELU/residual post-ops) and in
    # float32 where packing float32 pays (MKL runs AVX2 code: oneDNN's GEMM is faster); the connector
    # keeps nn.Linear
    vision_packed = [isinstance(m, (PackedLinear, PackedPart)) for m in packed.model.vision_model.modules()
                     if isinstance(m, (nn.Linear, PackedLinear, PackedPart)) and not isinstance(m, PackedFused)]
    want = dtype == torch.bfloat16 or packing_pays(torch.float32)
    assert vision_packed and all(p == want for p in vision_packed)
    assert type(packed.model.connector.modality_projection.proj) is nn.Linear
    assert isinstance(packed.model.text_model.embed_tokens.weight, nn.Parameter)  # lookups still use the table
    assert_close(logits(packed), logits(plain), **TOL[dtype])
    assert greedy(packed) == greedy(plain)


@pytest.mark.parametrize("tie", [False, True])
def test_packing_at_load_reads_each_layer_on_first_use(tmp_path, tie):
    """``from_pretrained(pack=True)`` reads no packed weight while loading: each layer (or fused
    q/k/v, gate/up group) reads and packs its weight when it first runs, never more than the two
    other layers of a group alive when one is read, so the dense model never exists whole; the
    result equals packing a plain load."""
    require_packing(torch.bfloat16)
    d = save_tiny(tmp_path, tie)
    after = SmolVLM.from_pretrained(d, dtype=torch.bfloat16)
    pack_linears(after)
    with watched_layer_reads(2, skip=lambda name: tie and name == "lm_head") as read:
        during = SmolVLM.from_pretrained(d, dtype=torch.bfloat16, pack=True)
        packed = [m for m in during.modules() if isinstance(m, PackedLinear)]
        assert packed and all(m.pending for m in packed) and read == []
        got = logits(during)
    assert not any(m.pending for m in packed)
    assert sorted(read) == sorted(pack_targets(SmolVLM.from_pretrained(d, dtype=torch.bfloat16)))
    assert_close(got, logits(after), rtol=0, atol=0)
    a, b = during.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_pending_layer_saves_and_packs_on_to(tmp_path):
    """Before its first forward a layer packed on first use still has its checkpoint view: its state
    dict reads the weight without packing it; ``.to()`` reads and packs it."""
    require_packing(torch.bfloat16)
    d = save_tiny(tmp_path, False)
    plain = SmolVLM.from_pretrained(d, dtype=torch.bfloat16).state_dict()
    model = SmolVLM.from_pretrained(d, dtype=torch.bfloat16, pack=True)
    state = model.state_dict()
    assert state.keys() == plain.keys() and all(torch.equal(state[k], plain[k]) for k in plain)
    assert all(m.pending for m in model.modules() if isinstance(m, PackedLinear))
    model.to(torch.bfloat16)
    assert not any(m.pending for m in model.modules() if isinstance(m, PackedLinear))


def test_pack_pending_packs_every_layer_now(tmp_path):
    """What ``smolvlm serve`` calls before it listens: no request pays the packing."""
    from smolvlm.model.packed import pack_pending

    require_packing(torch.bfloat16)
    d = save_tiny(tmp_path, False)
    model = SmolVLM.from_pretrained(d, dtype=torch.bfloat16, pack=True)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert pack_pending(model) == len(layers) > 0 and not any(m.pending for m in layers)
    assert pack_pending(model) == 0
    reference = SmolVLM.from_pretrained(d, dtype=torch.bfloat16)
    pack_linears(reference)
    assert_close(logits(model), logits(reference), rtol=0, atol=0)


def test_a_checkpoint_changed_before_first_use_is_an_error(tmp_path):
    """Layers packed on first use read the file after the load: if it changed (rewritten, replaced)
    in between, the first forward says so instead of running other weights."""
    from smolvlm.weights.safetensors_io import CheckpointError

    require_packing(torch.bfloat16)
    d = save_tiny(tmp_path, False)
    model = SmolVLM.from_pretrained(d, dtype=torch.bfloat16, pack=True)
    SmolVLM.from_config(tiny_config()).save_pretrained(d)  # another model at the same path
    with pytest.raises(CheckpointError, match="changed or went away after the model was loaded"):
        logits(model)


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_loads_plain_where_packing_is_unavailable(tmp_path, tie):
    """bf16 on an AVX2-only CPU: pack=True loads the plain model, same numbers (no crash, no slow path)."""
    require_no_packing(torch.bfloat16)
    d = save_tiny(tmp_path, tie)
    plain = SmolVLM.from_pretrained(d, dtype=torch.bfloat16)
    packed = SmolVLM.from_pretrained(d, dtype=torch.bfloat16, pack=True)
    assert not any(isinstance(m, PackedLinear) for m in packed.modules())
    assert_close(logits(packed), logits(plain), rtol=0, atol=0)


def test_state_dict_and_save_survive_packing(tmp_path):
    d = save_tiny(tmp_path)
    plain = SmolVLM.from_pretrained(d)
    packed = SmolVLM.from_pretrained(d, pack=True)
    sd_plain, sd_packed = plain.state_dict(), packed.state_dict()
    assert sd_plain.keys() == sd_packed.keys()
    assert all(torch.equal(sd_plain[k], sd_packed[k]) for k in sd_plain)  # unpacking is exact
    packed.save_pretrained(tmp_path / "again")
    assert_close(logits(SmolVLM.from_pretrained(tmp_path / "again")), logits(plain), rtol=0, atol=0)
    # loading new weights into a packed model repacks them
    other = SmolVLM.from_config(tiny_config("smolvlm"))
    packed.load_state_dict(other.state_dict())
    assert_close(logits(packed), logits(other), **TOL[torch.float32])
    bad = {k: (v[:-1] if k == "lm_head.weight" else v) for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        packed.load_state_dict(bad)


def test_dtype_moves_repack_and_unsupported_ones_fail(tmp_path):
    require_packing(torch.bfloat16)
    d = save_tiny(tmp_path)
    packed = SmolVLM.from_pretrained(d, pack=True)
    want = logits(SmolVLM.from_pretrained(d, dtype=torch.bfloat16))
    packed.to(torch.bfloat16)
    assert packed.lm_head.weight.dtype == torch.bfloat16
    assert_close(logits(packed), want, **TOL[torch.bfloat16])
    with pytest.raises(RuntimeError, match="load it again without packing"):
        packed.to(torch.float16)


def test_bf16_move_is_refused_where_packing_is_unavailable(tmp_path):
    require_no_packing(torch.bfloat16)
    packed = SmolVLM.from_pretrained(save_tiny(tmp_path), pack=True)
    with pytest.raises(RuntimeError, match="load it again without packing"):
        packed.to(torch.bfloat16)


def test_packing_is_skipped_where_it_does_not_apply(tmp_path):
    d = save_tiny(tmp_path)
    fp16 = SmolVLM.from_pretrained(d, dtype=torch.float16, pack=True)  # oneDNN packing: fp32/bf16 only
    assert type(fp16.lm_head) is nn.Linear
    int8 = SmolVLM.from_pretrained(d, dtype=torch.bfloat16, quantize="int8", pack=True)  # quantized layers win
    assert not any(isinstance(m, (PackedLinear, PackedPart)) for n, m in int8.named_modules()
                   if not n.startswith("model.vision_model."))  # (its float vision tower packs as a float model's)
    from smolvlm.training.lora import LoRALinear

    lora = SmolVLM.from_pretrained(d)
    attn = lora.model.text_model.layers[0].self_attn
    attn.q_proj = LoRALinear(attn.q_proj, r=2, alpha=4.0)
    lora.pack_for_inference()
    assert type(attn.q_proj) is LoRALinear and type(attn.q_proj.lora_A) is nn.Linear  # LoRA layers untouched
    assert isinstance(attn.k_proj, PackedLinear)
    # packing after the fact (the default model's path) equals packing at load
    late = SmolVLM.from_pretrained(d).pack_for_inference()
    assert isinstance(late.lm_head, PackedLinear)
    assert_close(logits(late), logits(SmolVLM.from_pretrained(d, pack=True)), rtol=0, atol=0)


def test_packed_weights_are_copied_not_mapped(tmp_path, monkeypatch):
    """Aliased tensors share the whole file's mapping; ``copy`` keys get a buffer of their own, so
    the file pages of a weight that is packed (and freed) do not stay resident. (The tiny weight is
    below ``ALIAS_MIN_BYTES``: lowered here.)"""
    from smolvlm.weights import safetensors_io

    monkeypatch.setattr(safetensors_io, "ALIAS_MIN_BYTES", 0)
    d = save_tiny(tmp_path)
    f = d / "model.safetensors"
    key = "model.text_model.layers.0.mlp.up_proj.weight"
    t = load_safetensors(f, {key})[key]
    assert t.untyped_storage().nbytes() == f.stat().st_size  # aliased: a view of the mapped file
    c = load_safetensors(f, {key}, copy={key})[key]
    assert c.untyped_storage().nbytes() == c.nbytes and torch.equal(c, t)


def test_packed_linear_handles_odd_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    p = PackedLinear.from_linear(lin)
    x = torch.randn(2, 3, 16)
    assert_close(p(x), lin(x), **TOL[torch.float32])
    assert_close(p(x.transpose(0, 1)), lin(x.transpose(0, 1)), **TOL[torch.float32])  # non-contiguous
    assert p(torch.randn(0, 16)).shape == (0, 8)
    assert p(x.bfloat16()).dtype == torch.bfloat16  # a mismatched input is cast in and out
    with pytest.raises(ValueError, match="cannot pack"):
        PackedLinear(torch.randn(8, 16, dtype=torch.float16))
    assert packing_available(torch.float32)  # every x86-64 CPU oneDNN runs on packs fp32


def test_pack_auto_follows_the_measured_policy(tmp_path: Path) -> None:
    """``pack="auto"`` (the CLI and server): bf16 packs wherever oneDNN can; fp32 where MKL runs AVX2
    code (not on Intel CPUs with AVX-512, where packed fp32 GEMVs and GEMMs measured slower than
    ``F.linear``). Either way the outputs match the plain model at the dtype's tolerance."""
    from smolvlm import cpu
    from smolvlm.model.upcast import GemvLinear, text_gemv_pays

    d = save_tiny(tmp_path)
    intel_avx512 = cpu.vendor() == "GenuineIntel" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert packing_pays(torch.bfloat16) == packing_available(torch.bfloat16)
    assert packing_pays(torch.float32) == (packing_available(torch.float32) and not intel_avx512)
    assert not packing_pays(torch.float16)
    for dtype in (torch.float32, torch.bfloat16):
        auto = SmolVLM.from_pretrained(d, dtype=dtype, pack="auto")
        # text linears unpacked, run by smolvlm's GEMV: bf16 and float32 on AVX-512 without AMX
        gemv = text_gemv_pays(dtype)
        assert isinstance(auto.lm_head, PackedLinear) == (packing_pays(dtype) and not gemv), dtype
        assert isinstance(auto.lm_head, GemvLinear) == gemv, dtype
        # the vision tower is packed wherever its dtype's packing pays
        assert isinstance(auto.model.vision_model.encoder.layers[0].mlp.fc1, PackedLinear) == packing_pays(dtype)
        assert_close(logits(auto), logits(SmolVLM.from_pretrained(d, dtype=dtype)), **TOL[dtype])
    late = SmolVLM.from_pretrained(d).pack_for_inference(auto=True)
    assert isinstance(late.lm_head, PackedLinear) == (packing_pays(torch.float32) and not text_gemv_pays(torch.float32))
    assert isinstance(late.lm_head, GemvLinear) == text_gemv_pays(torch.float32)
    with pytest.raises(ValueError, match="pack must be True, False or 'auto'"):
        SmolVLM.from_pretrained(d, pack="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_gelu_and_residual_post_ops_match_separate_ops(dtype):
    """``linear_gelu_tanh`` / ``linear_add`` on a packed linear (one oneDNN kernel with a post-op)
    equal the separate ops: fp32 to summation order; bf16 within 2 bf16 ulps of the fp32 truth,
    which the separate ops (rounding twice) are too."""
    from smolvlm.model.packed import VISION_ROWS, linear_add, linear_gelu_tanh

    require_packing(dtype)
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 96)
    lin = lin.to(dtype)
    xd, rd = torch.randn(3, 40, 64, generator=g).to(dtype), torch.randn(3, 40, 96, generator=g).to(dtype)
    with torch.no_grad():  # the truth: the same (rounded) inputs, fp32 math
        exact = torch.nn.functional.linear(xd.float(), lin.weight.float(), lin.bias.float())
    truth_gelu, truth_add = torch.nn.functional.gelu(exact, approximate="tanh"), rd.float() + exact
    packed = PackedLinear.from_linear(lin, rows=VISION_ROWS)
    for fused, plain, truth in ((linear_gelu_tanh(packed, xd), linear_gelu_tanh(lin, xd), truth_gelu),
                                (linear_add(packed, xd, rd), linear_add(lin, xd, rd), truth_add)):
        assert fused.dtype == dtype and fused.shape == plain.shape
        if dtype == torch.float32:
            assert_close(fused, plain, rtol=1e-5, atol=1e-5)
        else:
            tol = dict(rtol=2 ** -7, atol=2 ** -7)  # 2 ulps at O(1) magnitudes
            assert_close(fused.float(), truth.float(), **tol)
            assert_close(plain.float(), truth.float(), **tol)


def test_fused_parts_run_alone_and_refuse_wrong_shapes(tmp_path):
    """A fused projection's part (``q_proj``...) called alone equals the plain linear, and loading a
    wrongly shaped part is an error naming its key."""
    d = save_tiny(tmp_path)
    plain = SmolVLM.from_pretrained(d)
    packed = SmolVLM.from_pretrained(d, pack=True)
    x = torch.randn(2, 5, plain.config.text_config.hidden_size)
    for name in ("q_proj", "k_proj", "v_proj"):
        part = getattr(packed.model.text_model.layers[1].self_attn, name)
        assert isinstance(part, PackedPart)
        with torch.no_grad():
            assert_close(part(x), getattr(plain.model.text_model.layers[1].self_attn, name)(x), **TOL[torch.float32])
    sd = plain.state_dict()
    key = "model.text_model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        packed.load_state_dict({**sd, key: sd[key][:-1]})


@pytest.mark.parametrize("tie", [False, True])
def test_unpacking_the_text_side_keeps_outputs_fusion_and_checkpoint(tmp_path, tie):
    """``unpack_linears`` (compile mode max-autotune): the text decoder's and lm_head's packed
    linears become dense again, fused groups as ``DenseFused``; the vision tower stays packed.
    bf16 dense F.linear and packed oneDNN differ only in blocking (module docstring's tolerance)."""
    require_packing(torch.bfloat16)
    d = save_tiny(tmp_path, tie)
    plain = SmolVLM.from_pretrained(d, dtype=torch.bfloat16)
    model = SmolVLM.from_pretrained(d, dtype=torch.bfloat16, pack=True)
    names = unpack_linears(model)
    assert "lm_head" in names and all(n.startswith(("model.text_model.", "lm_head")) for n in names)
    attn = model.model.text_model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, DenseFused) and attn.q_proj.fused is attn.qkv_proj
    assert type(model.lm_head) is nn.Linear and type(attn.o_proj) is nn.Linear
    assert any(isinstance(m, PackedLinear) for m in model.model.vision_model.modules())
    assert_close(logits(model), logits(plain), **TOL[torch.bfloat16])
    assert greedy(model) == greedy(plain)
    want = plain.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # loading rows into the parts still writes the fused weight
    model.load_state_dict({k: torch.zeros_like(v) if k.endswith("k_proj.weight") else v for k, v in want.items()})
    k_rows = attn.qkv_proj.weight[attn.qkv_proj.rows_of(1)]
    assert not k_rows.any() and attn.qkv_proj.weight[attn.qkv_proj.rows_of(0)].any()


@pytest.mark.parametrize("onednn", [False, True])
def test_wide_linear_is_f_linear_through_onednn_where_packing_float32_pays(monkeypatch, onednn):
    """``wide_linear``: float32 calls run oneDNN on the plain weight where packing float32 pays (the same
    products as ``F.linear``, another summation order: fp32 tolerance), else ``F.linear`` itself; other
    dtypes, calls that need a gradient and compiled traces always ``F.linear``."""
    from smolvlm.model import packed

    monkeypatch.setattr(packed, "_f32_onednn_pays", lambda: onednn)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].shape) or real(*a))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    x = torch.randn(2, 37, 96, generator=g)[..., :64]  # batched rows, not contiguous
    for bias in (b, None):
        with torch.no_grad():
            got = packed.wide_linear(x, w, bias)
        assert got.shape == (2, 37, 48)
        assert_close(got, F.linear(x, w, bias), **TOL[torch.float32])
    assert len(calls) == (2 if onednn else 0)
    calls.clear()
    wb = w.bfloat16()  # bf16: F.linear (which runs oneDNN for bf16 itself)
    with torch.no_grad():
        assert torch.equal(packed.wide_linear(x.bfloat16(), wb), F.linear(x.bfloat16(), wb))
    leaf = w.clone().requires_grad_()
    out = packed.wide_linear(x, leaf, b)  # training: F.linear, which has a gradient
    out.sum().backward()
    assert leaf.grad is not None and calls == []
