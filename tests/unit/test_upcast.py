"""bf16 GEMMs/convolutions computed in float32 on CPUs without a fast bf16 path (``model/upcast.py``).

Which CPUs that is (AVX2-only) is monkeypatched here, so both policies run on every CPU. Tolerances:
a bf16 GEMM and the float32 GEMM of the same bf16 operands compute the same products with float32
accumulation and round once to bf16, so they differ by summation order only: at most about one bf16
ulp of the output (2e-2 at O(1) values, the bf16 tolerance of the packed tests). A layer left in
bf16 by mistake would still match at that tolerance, so the layer types are asserted too.
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
from smolvlm.model import upcast
from smolvlm.model.packed import wide_linear
from smolvlm.model.upcast import MIN_ROWS, GemvLinear, UpcastConv2d, UpcastLinear, upcast_slow_bf16
from tests.helpers import tiny_config

TOL = dict(rtol=2e-2, atol=2e-2)


def plain_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and m.weight.dtype == torch.bfloat16]


def greedy(model: SmolVLM) -> list[int]:
    ids = torch.tensor([[5, 299, 299, 299, 299, 7, 8]])
    pv = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(model.dtype)
    return generate_ids(model, ids, pixel_values=pv, max_new_tokens=8, eos_token_id=[])[0].tolist()


@torch.inference_mode()
def test_linear_and_conv_compute_in_float32_from_min_rows():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 96).bfloat16()
    up = nn.Linear(64, 96).bfloat16()
    up.load_state_dict(lin.state_dict())
    assert upcast_slow_bf16(up, force=True) == [""] and type(up) is UpcastLinear
    for rows in (1, MIN_ROWS - 1):  # decode-sized calls keep the bf16 kernel: bit for bit the plain layer
        x = torch.randn(rows, 64, generator=g).bfloat16()
        assert torch.equal(up(x), lin(x))
    x = torch.randn(2, MIN_ROWS, 64, generator=g).bfloat16()
    got = up(x)
    assert got.dtype == torch.bfloat16
    # float32 products rounded once: ``packed.wide_linear`` bit for bit (oneDNN's GEMM where MKL runs AVX2
    # code, else F.linear), so F.linear's float32 result up to summation order, then one bf16 rounding
    f32 = (x.float(), lin.weight.float(), lin.bias.float())
    assert torch.equal(got, wide_linear(*f32).bfloat16())
    assert_close(got.float(), F.linear(*f32), rtol=2.0**-8, atol=1e-5)
    assert_close(got.float(), lin(x).float(), **TOL)

    conv = nn.Conv2d(3, 16, 4, 4).bfloat16()
    upc = nn.Conv2d(3, 16, 4, 4).bfloat16()
    upc.load_state_dict(conv.state_dict())
    upcast_slow_bf16(upc, force=True)
    assert type(upc) is UpcastConv2d and upc.state_dict().keys() == conv.state_dict().keys()
    img = torch.randn(2, 3, 16, 16, generator=g).bfloat16()
    assert upc(img).dtype == torch.bfloat16
    assert_close(upc(img).float(), conv(img).float(), **TOL)
    fp = nn.Linear(8, 8)  # float32 layers are never touched
    assert upcast_slow_bf16(fp, force=True) == [] and type(fp) is nn.Linear


@pytest.mark.parametrize("slow", [True, False])
def test_loader_upcasts_bf16_only_where_it_is_slow(tmp_path: Path, monkeypatch, slow):
    torch.manual_seed(0)
    d = tmp_path / "ckpt"
    SmolVLM.from_config(tiny_config("smolvlm")).save_pretrained(d)
    monkeypatch.setattr(upcast, "bf16_is_slow", lambda device="cpu": slow)
    plain = SmolVLM.from_pretrained(d, dtype=torch.bfloat16)  # pack=False: the reference modules, always
    assert not any(isinstance(m, (UpcastLinear, UpcastConv2d)) for m in plain.modules())
    fast = SmolVLM.from_pretrained(d, dtype=torch.bfloat16, pack="auto")
    changed = lambda model: [n for n, m in model.named_modules() if isinstance(m, (UpcastLinear, UpcastConv2d))]  # noqa: E731
    ups = [n for n in changed(fast) if not isinstance(fast.get_submodule(n), GemvLinear)]
    gemv = [n for n in changed(fast) if isinstance(fast.get_submodule(n), GemvLinear)]
    if slow:  # every bf16 layer packing left plain computes in float32, the patch embedding among them
        assert plain_layers(fast) == [] and "model.vision_model.embeddings.patch_embedding" in ups
        assert "model.connector.modality_projection.proj" in ups and gemv == []
    else:  # nothing computes in float32; the text linears run the bf16 GEMV where that pays (AVX-512, AMX included)
        assert ups == []
        assert bool(gemv) == upcast.text_gemv_pays(torch.bfloat16)
        assert all(n.startswith("model.text_model.") or n == "lm_head" for n in gemv)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    late = SmolVLM.from_pretrained(d, dtype=torch.bfloat16).pack_for_inference(auto=True)  # the same after loading
    assert changed(late) == changed(fast)
    ids = torch.tensor([[5, 299, 299, 299, 299, 7, 8, 9, 10, 11]])
    pv = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.inference_mode():
        assert_close(fast(input_ids=ids, pixel_values=pv).logits.float(),
                     plain(input_ids=ids, pixel_values=pv).logits.float(), **TOL)
    assert greedy(fast) == greedy(plain)
    f32 = SmolVLM.from_pretrained(d, pack="auto")  # float32: nothing computes upcast; GemvLinear where it pays
    assert not any(isinstance(m, (UpcastLinear, UpcastConv2d)) and not isinstance(m, GemvLinear) for m in f32.modules())
    assert isinstance(f32.lm_head, GemvLinear) == upcast.text_gemv_pays(torch.float32)
    quantized = SmolVLM.from_pretrained(d, dtype=torch.bfloat16, quantize="int8", pack="auto")
    assert isinstance(quantized.model.vision_model.embeddings.patch_embedding, UpcastConv2d) == slow


@pytest.mark.parametrize("slow", [True, False])
@torch.inference_mode()
def test_quantized_prefill_runs_in_float32_where_bf16_is_slow(monkeypatch, slow):
    """The int8/int4 layers' dequantizing path (prefill-sized calls; their kernels take the small
    ones) asks ``compute_dtype``: float32 where bf16 is slow, bit for bit the float32 product of the
    same dequantized weights; else bf16, as before. Both agree at the bf16 tolerance."""
    from smolvlm.quantization.int4 import Int4Linear
    from smolvlm.quantization.int8 import Int8Linear

    monkeypatch.setattr(upcast, "bf16_is_slow", lambda device="cpu": slow)
    torch.manual_seed(0)
    base = nn.Linear(64, 96, bias=False).bfloat16()
    for layer, rows in ((Int8Linear.from_linear(base), 16), (Int4Linear.from_linear(base, 32), 200)):
        x = torch.randn(rows, 64).bfloat16()
        got = layer(x)
        w = layer.dequantized_weight(torch.float32) if isinstance(layer, Int4Linear) else \
            layer.weight_int8.float() * layer.scale.float()[:, None]
        f32 = F.linear(x.float(), w)
        assert got.dtype == torch.bfloat16
        if slow and isinstance(layer, Int4Linear):
            assert torch.equal(got, f32.bfloat16())
        assert_close(got.float(), f32, **TOL)
        if slow and isinstance(layer, Int8Linear):  # the scale applied in float32, after the product
            want = (F.linear(x.float(), layer.weight_int8.float()) * layer.scale.float()).bfloat16()
            assert torch.equal(got, want)


def test_batched_commands_pack_the_gemv_linears(tmp_path: Path, monkeypatch, ref256):
    """The server and evaluation decode several rows a step, where oneDNN's packed GEMM beats the GEMV:
    ``load_model_and_processor(batched=True)`` packs the ``GemvLinear`` layers (q/k/v and gate/up fused),
    the outputs as before; one-stream commands keep them."""
    from smolvlm.cli import common
    from smolvlm.model.packed import PackedFused, PackedLinear, packing_available
    from smolvlm.model.upcast import pack_gemv_linears

    if not packing_available(torch.bfloat16):
        pytest.skip("this CPU's oneDNN has no bf16: nothing is packed and no GemvLinear is made (the AVX2 path)")
    torch.manual_seed(0)
    d = tmp_path / "ckpt"
    SmolVLM.from_config(tiny_config("smolvlm")).save_pretrained(d)
    monkeypatch.setattr(upcast, "text_gemv_pays", lambda dtype, device="cpu": dtype == torch.bfloat16)
    import smolvlm.model.vlm as vlm_mod
    import smolvlm.weights.load as load_mod
    monkeypatch.setattr(load_mod, "text_gemv_pays", upcast.text_gemv_pays)
    monkeypatch.setattr(vlm_mod, "text_gemv_pays", upcast.text_gemv_pays)
    from smolvlm import SmolVLMProcessor

    proc = SmolVLMProcessor.from_pretrained(ref256)
    one, _ = common.load_model_and_processor(str(d), "bfloat16", processor=proc)
    assert isinstance(one.lm_head, GemvLinear)
    many, _ = common.load_model_and_processor(str(d), "bfloat16", processor=proc, batched=True)
    assert not any(isinstance(m, GemvLinear) for m in many.modules())
    assert isinstance(many.lm_head, PackedLinear)
    assert isinstance(many.model.text_model.layers[0].self_attn.qkv_proj, PackedFused)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.inference_mode():
        assert_close(many(input_ids=ids).logits.float(), one(input_ids=ids).logits.float(), **TOL)
    assert many.state_dict().keys() == one.state_dict().keys()
    assert pack_gemv_linears(many) == []  # nothing left to pack


@pytest.mark.parametrize("pays", [False, True])
def test_batched_float32_gemv_linears_stay_unpacked(monkeypatch, pays):
    """A float32 model's ``GemvLinear``s stay for batches whether or not packing float32 pays: the GEMV beats
    MKL's at 1-16 rows, and oneDNN's packed GEMV at 1-8 rows (AVX-512) or 1-16 (AVX2); wider calls are
    ``packed.wide_linear``, as fast as packed where packing pays."""
    from smolvlm.model.packed import packing_available
    from smolvlm.model.upcast import gemv_text_linears, pack_gemv_linears

    model = SmolVLM.from_config(tiny_config("smolvlm"))
    changed = gemv_text_linears(model, force=True)
    monkeypatch.setattr(upcast, "packing_pays", lambda dtype, device="cpu": pays and packing_available(dtype))
    assert pack_gemv_linears(model) == []
    assert [n for n, m in model.named_modules() if isinstance(m, GemvLinear)] == changed
