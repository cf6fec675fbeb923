"""Weight-only quantization: error bounds per layer, greedy agreement, save/load round trip.

Bounds. int8 rounds w/scale to the nearest integer, so |w - w_hat| <= scale/2 per row exactly (a
1e-6 relative slack for float32 arithmetic); int4 likewise per group with its own scale. Kernel
paths (bf16 activations) are compared with the fp32 dequantized reference at bf16 tolerance:
rtol = atol = 2e-2, a few bf16 ulps (2^-8 = 3.9e-3) on O(1) outputs after a 64..128-term sum.

Weights already on an int4 grid (issue #16: the default model is a Q4_1 GGUF, blocks of 32, plus
a merged LoRA smaller than half a step): group 32 rounds the update away, ``quantize`` must
refuse it or pick group 64. See ``on_grid_plus_update`` for the numbers behind the bounds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from smolvlm import SmolVLM
from smolvlm.generation.generate import generate_ids
from smolvlm.quantization import (Int4Linear, Int8Linear, QuantizationError, quantize, quantized_modules,
                                  target_linears)
from smolvlm.quantization.int4 import (dequantize_int4, erased_update, pack_nibbles, quantize_int4,
                                       unpack_nibbles)
from smolvlm.quantization.int4 import KERNEL_MAX_ROWS as INT4_MAX_ROWS
from smolvlm.quantization.int8 import KERNEL_MAX_ROWS
from tests.helpers import tiny_config, watched_layer_reads

BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def linear(k: int = 128, n: int = 96, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[3] = 0.0  # an all-zero row must not divide by zero
    return lin


def test_int8_weight_error_is_at_most_half_a_step():
    lin = linear()
    q = Int8Linear.from_linear(lin)
    err = (q.dequantized_weight() - lin.weight).abs()  # (N, K)
    assert (err <= q.scale[:, None] / 2 * (1 + 1e-6)).all()
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() <= 127
    assert torch.equal(q.dequantized_weight()[3], torch.zeros(128))


def test_int8_fp32_path_matches_dequantized_linear_and_bound():
    lin = linear()
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 5, 128)
    y = q(x)
    assert_close(y, nn.functional.linear(x, q.dequantized_weight(), lin.bias), rtol=1e-5, atol=1e-5)
    # output error bound from the weight bound: |x| . scale/2 per output channel
    bound = x.abs().sum(-1, keepdim=True) * q.scale / 2 + 1e-5
    assert ((y - lin(x)).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS + 5])  # CPU kernel (GEMV) and dequantize+GEMM paths
def test_int8_bf16_paths_match_reference(rows):
    lin = linear()
    q = Int8Linear.from_linear(lin)
    x = torch.randn(1, rows, 128)
    ref = nn.functional.linear(x, q.dequantized_weight(), lin.bias)
    got = q.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == (1, rows, 96)
    assert_close(got.float(), ref, **BF16_TOL)


def test_int4_pack_roundtrip_and_error_bound():
    w = torch.randn(40, 64)
    q, scales, zeros = quantize_int4(w, 32)
    assert q.max() <= 15 and torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    lin = nn.Linear(64, 40, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = Int4Linear.from_linear(lin, 32)
    err = (m.dequantized_weight() - w).abs().reshape(40, 2, 32)
    assert (err <= m.scales[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, INT4_MAX_ROWS + 1])
def test_int4_bf16_paths_match_reference(rows):
    lin = linear(k=128, n=64)
    m = Int4Linear.from_linear(lin, 32)
    x = torch.randn(rows, 128)
    ref = nn.functional.linear(x, m.dequantized_weight(), lin.bias)
    assert_close(m(x), ref, rtol=1e-5, atol=1e-5)  # fp32: dequantize + linear
    assert_close(m.to(torch.bfloat16)(x.bfloat16()).float(), ref, **BF16_TOL)


def test_bad_modes_raise():
    model = SmolVLM.from_config(tiny_config())
    with pytest.raises(QuantizationError, match="unknown quantization mode"):
        quantize(model, "int3")
    with pytest.raises(QuantizationError, match="group_size"):
        quantize(model, "int4", group_size=48)


def test_quantize_swaps_text_linears_and_lm_head_only():
    model = quantize(SmolVLM.from_config(tiny_config()), "int8")
    names = set(quantized_modules(model))
    assert "lm_head" in names and "model.text_model.layers.1.mlp.down_proj" in names
    assert len(names) == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    assert not any(n.startswith("model.vision_model") for n in names)
    assert isinstance(model.model.vision_model.encoder.layers[0].mlp.fc1, nn.Linear)
    v = quantize(SmolVLM.from_config(tiny_config()), "int8", vision=True)
    assert isinstance(v.model.vision_model.encoder.layers[0].mlp.fc1, Int8Linear)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_tokens_agree_with_unquantized(mode):
    """Tiny random model (fp32 activations), 12 greedy tokens for two prompts: int8 agrees on all
    of them; int4 (16 levels per group of 32, ~10x the int8 weight error) on the first 8: random
    weights give near-ties late in a sequence, where one flipped token changes the rest."""
    torch.manual_seed(0)
    base = SmolVLM.from_config(tiny_config())
    q = quantize(_clone(base), mode, group_size=32)
    n = 12 if mode == "int8" else 8
    for seed in (1, 2):
        ids = torch.randint(3, 290, (1, 10), generator=torch.Generator().manual_seed(seed))
        a = generate_ids(base, ids, max_new_tokens=12, eos_token_id=[])[:, : 10 + n]
        b = generate_ids(q, ids, max_new_tokens=12, eos_token_id=[])[:, : 10 + n]
        assert torch.equal(a, b), (mode, seed)


def _clone(model: SmolVLM) -> SmolVLM:
    other = SmolVLM.from_config(model.config)
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tie", [False, True])
def test_save_load_roundtrip_identical(tmp_path, mode, tie):
    torch.manual_seed(0)
    base = SmolVLM.from_config(tiny_config(tie=tie))
    q = quantize(base, mode, group_size=32)
    if tie:  # lm_head was untied and quantized; the embedding table is still there for lookups
        assert isinstance(q.lm_head, (Int8Linear, Int4Linear))
    d = q.save_pretrained(tmp_path / "q")
    assert (d / "quantization.json").is_file()
    back = SmolVLM.from_pretrained(d)  # from_pretrained recognises the quantized folder
    ids = torch.tensor([[5, 299, 299, 299, 299, 7, 8]])
    pv = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        want = q(input_ids=ids, pixel_values=pv).logits
        got = back(input_ids=ids, pixel_values=pv).logits
    assert torch.equal(want, got)
    assert type(back.lm_head) is type(q.lm_head)
    assert not (SmolVLM.from_config(tiny_config()).save_pretrained(tmp_path / "f") / "quantization.json").exists()
    SmolVLM.from_config(tiny_config()).save_pretrained(d)  # a float save over it drops the stale description
    assert not (d / "quantization.json").exists()
    q.save_pretrained(d)
    with pytest.raises(QuantizationError, match="cannot load it as"):
        SmolVLM.from_pretrained(d, quantize="int4" if mode == "int8" else "int8")
    with torch.no_grad():  # bf16 load of the same folder runs the kernel path
        bf = SmolVLM.from_pretrained(d, dtype=torch.bfloat16)
        assert_close(bf(input_ids=ids, pixel_values=pv).logits.float(), want, **BF16_TOL)


def test_int4_kernel_layout_is_the_one_copy_and_saves_as_nibbles(tmp_path, monkeypatch):
    """PyTorch's int4 kernel (smolvlm's own, which takes the nibbles as they are, is switched off here:
    tests/unit/test_cpu_kernels.py covers it). Where the output width is a multiple of the CPU's row block (64 with AVX-512, 32 with AVX2: torch
    picks it by ISA, so both CPU kinds are covered by whichever runs this) the CPU kernel's layout is a
    byte rearrangement of ``pack_nibbles`` (checked against torch's own conversion), so the first kernel
    call replaces the nibble buffer by it instead of keeping both; a width that is not a multiple of it keeps the
    nibbles plus torch's converted copy. The kernel's bf16 scales-and-zeros table is then the only
    copy of the scales and zeros (``scales``/``zeros`` are views of it): state dicts and saving
    still give float32 (the bf16 values the kernel computes with), nibbles, and the same outputs
    once loaded again."""
    from smolvlm import kernels
    from smolvlm.quantization.int4 import from_kernel_layout, kernel_block, to_kernel_layout

    monkeypatch.setitem(kernels._state, "use", "off for this test")
    block = kernel_block()
    assert block in (32, 64)
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (192, 128), generator=g, dtype=torch.int32)
    assert torch.equal(to_kernel_layout(pack_nibbles(q), block), torch._convert_weight_to_int4pack_for_cpu(q, 1))
    assert torch.equal(from_kernel_layout(to_kernel_layout(pack_nibbles(q), block), block), pack_nibbles(q))
    for b in (32, 64):  # the byte rule for both CPU kinds, whichever this one is
        k = to_kernel_layout(pack_nibbles(q), b).view(192 // b, 128, b // 2)
        blk, kk, i = 2, 77, b // 2 - 3
        assert int(k[blk, kk, i]) == int(q[blk * b + i, kk]) | int(q[blk * b + b // 2 + i, kk]) << 4
        assert torch.equal(from_kernel_layout(k.view(192, 64), b), pack_nibbles(q))
    for n, one_copy in ((128, True), (80, False)):
        m = Int4Linear.from_linear(linear(k=128, n=n, bias=False), 32)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        x = torch.randn(1, 128).bfloat16()
        with torch.inference_mode():
            got = m(x)
            want = nn.functional.linear(x.float(), m.dequantized_weight()).bfloat16()
        assert_close(got.float(), want.float(), **BF16_TOL)
        assert m._kernel_layout == one_copy and (m._kernel[1] is m.weight_uint4) == one_copy
        table = m._kernel[2]
        assert table.dtype == torch.bfloat16 and m.scales.dtype == m.zeros.dtype == torch.bfloat16
        assert m.scales.untyped_storage().data_ptr() == m.zeros.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
        after = m.state_dict()
        assert after.keys() == before.keys() and torch.equal(after["weight_uint4"], before["weight_uint4"])
        for k in ("scales", "zeros"):
            assert after[k].dtype == torch.float32 and after[k].is_contiguous()
            assert torch.equal(after[k], before[k].bfloat16().float()), k
        assert torch.equal(m.nibbles(5, 70), before["weight_uint4"][5:70])
        assert torch.equal(m.dequantized_weight(), dequantize_int4(unpack_nibbles(before["weight_uint4"]),
                                                                   after["scales"], after["zeros"]))
        back = Int4Linear(128, n, group_size=32)
        back.load_state_dict(after)
        assert not back._kernel_layout and torch.equal(back(x), got)


def test_int4_keeps_the_head_at_int8_and_saves_which(tmp_path):
    """int4's lm_head is int8 unless ``head="int4"`` (as llama.cpp's Q4 files keep their output
    matrix wider); the saved description (format 2) says which modules are int8, and a version-1
    file (no ``int8_modules``: every module int4) still loads as it was saved."""
    import json

    torch.manual_seed(0)
    base = SmolVLM.from_config(tiny_config())
    q = quantize(_clone(base), "int4", group_size=32)
    assert isinstance(q.lm_head, Int8Linear) and q.quantization["int8_modules"] == ["lm_head"]
    assert all(isinstance(m, Int4Linear) for n, m in quantized_modules(q).items() if n != "lm_head")
    old = quantize(_clone(base), "int4", group_size=32, head="int4")
    assert isinstance(old.lm_head, Int4Linear) and old.quantization["int8_modules"] == []
    with pytest.raises(QuantizationError, match="unknown head quantization 'fp8'"):
        quantize(_clone(base), "int4", head="fp8")
    ids = torch.tensor([[5, 299, 7, 8]])
    for model, name in ((q, "new"), (old, "old")):
        d = model.save_pretrained(tmp_path / name)
        info = json.loads((d / "quantization.json").read_text())
        assert info["format_version"] == 2 and info["int8_modules"] == model.quantization["int8_modules"]
        back = SmolVLM.from_pretrained(d)
        assert type(back.lm_head) is type(model.lm_head)
        with torch.no_grad():
            assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    d = tmp_path / "old"
    info = json.loads((d / "quantization.json").read_text())
    del info["int8_modules"]
    (d / "quantization.json").write_text(json.dumps({**info, "format_version": 1}))
    assert isinstance(SmolVLM.from_pretrained(d).lm_head, Int4Linear)
    (d / "quantization.json").write_text(json.dumps({**info, "format_version": 2, "int8_modules": ["nope"]}))
    with pytest.raises(QuantizationError, match="'int8_modules' names modules that 'modules' does not"):
        SmolVLM.from_pretrained(d)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tie", [False, True])
def test_quantizing_while_loading_equals_quantizing_after(tmp_path, mode, tie):
    """``from_pretrained(quantize=)`` quantizes layer by layer as it reads (``quantize_while_loading``):
    the same modules, buffers and logits as loading in float and calling ``quantize``; and each
    layer's float weights are gone before the next layer is read."""
    torch.manual_seed(0)
    d = SmolVLM.from_config(tiny_config(tie=tie)).save_pretrained(tmp_path / "f")
    after = quantize(SmolVLM.from_pretrained(d), mode)
    with watched_layer_reads(0, skip=lambda name: tie and name == "lm_head") as read:
        during = SmolVLM.from_pretrained(d, quantize=mode)
    assert during.quantization == after.quantization and len(read) > 10
    a, b = during.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[5, 299, 299, 299, 299, 7, 8]])
    pv = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(during(input_ids=ids, pixel_values=pv).logits, after(input_ids=ids, pixel_values=pv).logits)
    assert torch.equal(during.model.text_model.embed_tokens.weight, after.model.text_model.embed_tokens.weight)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_vision_is_int8_at_load_and_as_saved(tmp_path, mode):
    """``quantize_vision=True`` (the CLI's ``--quantize-vision``): the vision encoder's and the
    connector's linears become int8 in either mode, read one layer at a time like the text ones and
    equal to ``quantize(vision=True)`` after a float load; saved, the model loads back as it was.
    The image features stay within 3% (relative norm) of the float model's: int8 per-channel rounding
    is ~0.6% rms per layer on Gaussian weights, this 2-layer tower measures 0.63%, and SmolVLM-2.2B's
    27-layer one ~3% (bench/BIG_MODEL.md, where two bf16 paths differ by 1.5%). Asking for it without quantizing the text model, or on a
    folder saved with a float tower, is a clear error."""
    torch.manual_seed(0)
    d = SmolVLM.from_config(tiny_config()).save_pretrained(tmp_path / "f")
    ref = SmolVLM.from_pretrained(d)
    after = quantize(SmolVLM.from_pretrained(d), mode, vision=True)
    with watched_layer_reads(0) as read:
        m = SmolVLM.from_pretrained(d, quantize=mode, quantize_vision=True)
    assert m.quantization == after.quantization
    vision = [n for n in m.quantization["modules"] if n.startswith(("model.vision_model.", "model.connector."))]
    assert len(vision) == 2 * 6 + 1 and set(vision) <= set(read)  # 2 layers x q/k/v/out/fc1/fc2 + the projection
    assert all(isinstance(m.get_submodule(n), Int8Linear) for n in vision)
    assert isinstance(m.model.text_model.layers[0].mlp.up_proj, Int8Linear if mode == "int8" else Int4Linear)
    a, b = m.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pv = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = m.get_image_features(pv), ref.get_image_features(pv)
        assert (got - want).norm() / want.norm() < 0.03
        back = SmolVLM.from_pretrained(m.save_pretrained(tmp_path / "q"), quantize_vision=True)
        assert back.quantization == m.quantization and torch.equal(back.get_image_features(pv), got)
    with pytest.raises(QuantizationError, match="needs quantize='int8' or 'int4'"):
        SmolVLM.from_pretrained(d, quantize_vision=True)
    text_only = quantize(SmolVLM.from_pretrained(d), mode).save_pretrained(tmp_path / "t")
    with pytest.raises(QuantizationError, match="saved with a float vision tower"):
        SmolVLM.from_pretrained(text_only, quantize_vision=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_inference_load_packs_the_float_vision_tower_as_a_float_load_does(tmp_path, dtype):
    """``pack="auto"`` with a quantized text model (the CLI's ``--quantize``, at load or as saved): the float
    vision tower is packed where packing its dtype pays, as a float model's is (oneDNN's GEMM and fused
    GELU/residual post-ops), with the same image features at the dtype's tolerance; a quantized tower
    (``quantize_vision``) is left as it is; the state dict is the unpacked load's."""
    from smolvlm.model.packed import PackedLinear, packing_pays

    torch.manual_seed(0)
    d = SmolVLM.from_config(tiny_config()).save_pretrained(tmp_path / "f")
    saved = SmolVLM.from_pretrained(d, quantize="int8").save_pretrained(tmp_path / "q")
    plain = SmolVLM.from_pretrained(d, dtype=dtype, quantize="int8")
    pv = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for m in (SmolVLM.from_pretrained(d, dtype=dtype, quantize="int8", pack="auto"),
              SmolVLM.from_pretrained(saved, dtype=dtype, pack="auto")):
        fc1 = m.model.vision_model.encoder.layers[0].mlp.fc1
        assert isinstance(fc1, PackedLinear) == packing_pays(dtype)
        assert isinstance(m.model.text_model.layers[0].mlp.up_proj, Int8Linear)
        assert m.state_dict().keys() == plain.state_dict().keys()
        with torch.no_grad():
            assert_close(m.get_image_features(pv).float(), plain.get_image_features(pv).float(), **tol)
    both = SmolVLM.from_pretrained(d, dtype=dtype, quantize="int8", quantize_vision=True, pack="auto")
    assert isinstance(both.model.vision_model.encoder.layers[0].mlp.fc1, Int8Linear)


def test_packing_a_saved_quantized_models_vision_tower_unmaps_the_file_pages_it_read(tmp_path, monkeypatch):
    """A saved quantized model loads its float vision tower as views of the file's mapping; packing reads
    them all, so their file pages are unmapped after (the packed copy replaces them; RSS would otherwise
    hold the tower twice). Quantizing at load reads them into private memory: nothing to unmap. (The tiny
    weights are below ``ALIAS_MIN_BYTES``: lowered here.)"""
    from smolvlm.model.packed import packing_pays
    from smolvlm.weights import load as load_mod

    if not packing_pays(torch.float32):
        pytest.skip("packing float32 does not pay on this CPU (an Intel CPU with AVX-512: MKL is faster), so "
                    "the vision tower stays on the file mapping unpacked; the CPUs that pack it run this test")
    torch.manual_seed(0)
    d = SmolVLM.from_config(tiny_config()).save_pretrained(tmp_path / "f")
    saved = SmolVLM.from_pretrained(d, quantize="int8").save_pretrained(tmp_path / "q")
    from smolvlm.weights import safetensors_io

    monkeypatch.setattr(safetensors_io, "ALIAS_MIN_BYTES", 0)  # the tiny weights alias as full-size ones do
    dropped = []
    monkeypatch.setattr(load_mod, "drop_file_pages", lambda t: dropped.append(tuple(t.shape)) or 0)
    SmolVLM.from_pretrained(saved, pack="auto")
    fc1 = tuple(SmolVLM.from_pretrained(saved).model.vision_model.encoder.layers[0].mlp.fc1.weight.shape)
    assert fc1 in dropped and len(dropped) == 2 * 6  # 2 layers x q/k/v/out/fc1/fc2
    dropped.clear()
    SmolVLM.from_pretrained(d, quantize="int8", pack="auto")
    assert dropped == []


def test_quantized_load_leaves_the_token_embedding_on_the_file_mapping(tmp_path, monkeypatch):
    """Quantizing at load reads every other tensor into private memory, but the token embedding
    stays on the file's copy-on-write mapping (a lookup touches only the rows it reads: SmolVLM-2.2B
    holds 192 MiB of bf16 table, a short prompt a few hundred KiB of it); values unchanged. (The tiny
    table is below ``ALIAS_MIN_BYTES``: lowered here.)"""
    from smolvlm.weights import safetensors_io

    monkeypatch.setattr(safetensors_io, "ALIAS_MIN_BYTES", 0)
    d = SmolVLM.from_config(tiny_config()).save_pretrained(tmp_path / "f")
    size = (d / "model.safetensors").stat().st_size
    plain = SmolVLM.from_pretrained(d, mmap=False)
    for mode in ("int8", "int4"):
        m = SmolVLM.from_pretrained(d, quantize=mode)
        emb = m.model.text_model.embed_tokens.weight
        assert emb.untyped_storage().nbytes() == size and torch.equal(emb, plain.model.text_model.embed_tokens.weight)
        norm = m.model.text_model.norm.weight
        assert norm.untyped_storage().nbytes() == norm.numel() * norm.element_size()  # read, not mapped


def test_from_pretrained_quantize_flag(tmp_path):
    d = tmp_path / "ckpt"
    SmolVLM.from_config(tiny_config()).save_pretrained(d)
    m = SmolVLM.from_pretrained(d, quantize="int8")
    assert isinstance(m.model.text_model.layers[0].self_attn.q_proj, Int8Linear)
    with pytest.raises(QuantizationError):
        SmolVLM.from_pretrained(d, quantize="fp8")


def test_bad_quantization_description_is_a_clear_error(tmp_path):
    d = quantize(SmolVLM.from_config(tiny_config()), "int8").save_pretrained(tmp_path / "q")
    (d / "quantization.json").write_text('{"format_version": 7}')
    with pytest.raises(QuantizationError, match="unsupported format_version 7"):
        SmolVLM.from_pretrained(d)
    (d / "quantization.json").write_text("{")
    with pytest.raises(QuantizationError, match="not valid JSON"):
        SmolVLM.from_pretrained(d)


def test_cli_quantize_flag():
    import argparse

    from smolvlm.cli import common

    p = argparse.ArgumentParser()
    common.add_model_args(p)
    assert p.parse_args(["--model", "x", "--quantize", "int8"]).quantize == "int8"
    assert p.parse_args(["--model", "x"]).quantize == "none"
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "x", "--quantize", "int3"])


# -- weights that already sit on an int4 grid (issue #16) ------------------------------------------
def on_grid_plus_update(n: int = 128, k: int = 64, rms_steps: float = 0.05, seed: int = 0):
    """(w0, delta): w0 on the group-32 int4 grid, as a dequantized Q4_1 GGUF is (16 levels a block
    of 32, both ends used); delta a rank-4 update of ``rms_steps`` quantization steps rms, as the
    default model's merged LoRA (0.012-0.065 steps rms, up to 0.5 steps at its largest)."""
    g = torch.Generator().manual_seed(seed)
    w0 = dequantize_int4(*quantize_int4(torch.randn(n, k, generator=g) * 0.05, 32))
    step = quantize_int4(w0, 32)[1].mean()
    delta = torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g)
    return w0, delta * (rms_steps * step / delta.pow(2).mean().sqrt())


def _erased(w: torch.Tensor, group_size: int = 32) -> float:
    q, scales, zeros = quantize_int4(w, group_size)
    return erased_update(w, dequantize_int4(q, scales, zeros), scales)


def _kept(w0: torch.Tensor, delta: torch.Tensor, group_size: int) -> float:
    """Share of ``delta`` that int4 of ``w0 + delta`` keeps: <w_hat - w0, delta> / |delta|^2."""
    w_hat = dequantize_int4(*quantize_int4(w0 + delta, group_size))
    return ((w_hat - w0) * delta).sum().item() / (delta * delta).sum().item()


def test_erased_update_tells_grid_plus_update_from_lossless_and_ordinary_weights():
    w0, delta = on_grid_plus_update()
    # on the grid: int4 is lossless (float32 arithmetic only), also after the dtype's own rounding
    q, scales, zeros = quantize_int4(w0, 32)
    assert ((dequantize_int4(q, scales, zeros) - w0).abs() <= 1e-5 * scales.repeat_interleave(32, 1)).all()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert _erased(w0.to(dtype)) == 0.0, dtype
    assert _erased(torch.randn(128, 64)) == 0.0  # ordinary float weights: rounding noise, not an erasure
    assert _erased(w0 + delta, 64) == 0.0  # group 64 straddles two source blocks: not their grid
    # grid + update: the int4 error is the update (1.25x its norm, measured: the grid's ends move with it)
    lost, size = _erased(w0 + delta), (delta.norm() / (w0 + delta).norm()).item()
    assert size <= lost <= 2 * size
    assert _erased((w0 + delta).bfloat16()) > 0  # 0.05 steps rms is well above bf16's rounding


def test_group_64_keeps_a_merged_update_that_group_32_rounds_away():
    """Group 32 keeps ~6% of the update (the default model: 6%, int8 100%). Group 64 keeps it in
    expectation except where a group's min and max both come from one source block, which aligns
    that block with its grid again: about half the groups, half their weights, so ~0.75 (0.63-0.78
    over seeds); its std over 8192 weights is 0.29 / (0.05 * sqrt(8192)) = 0.07."""
    for seed in range(3):
        w0, delta = on_grid_plus_update(seed=seed)
        assert _kept(w0, delta, 32) < 0.2
        assert _kept(w0, delta, 64) > 0.45


def _grid_model() -> SmolVLM:
    """The tiny model with every text linear set to a grid + update (lm_head stays random)."""
    model = SmolVLM.from_config(tiny_config())
    with torch.no_grad():
        for i, name in enumerate(n for n in target_linears(model) if n != "lm_head"):
            w = model.get_submodule(name).weight
            w0, delta = on_grid_plus_update(*w.shape, seed=i)
            w.copy_(w0 + delta)
    return model


def test_quantize_int4_refuses_group_32_on_grid_weights_and_picks_64():
    model = _grid_model()
    with pytest.raises(QuantizationError, match=r"round away a float update.*group_size 32 \(14 layer"):
        quantize(model, "int4", group_size=32)
    assert not quantized_modules(model)  # refused before anything was swapped
    quantize(model, "int4")
    assert model.quantization["group_size"] == 64
    assert model.model.text_model.layers[0].self_attn.q_proj.group_size == 64
    assert quantize(SmolVLM.from_config(tiny_config()), "int4").quantization["group_size"] == 32  # ordinary


def test_int4_group_size_must_divide_every_layer():
    model = SmolVLM.from_config(tiny_config())  # in_features 64 and 128
    with pytest.raises(QuantizationError, match="group_size 128 does not divide in_features.*use one of 32, 64"):
        quantize(model, "int4", group_size=128)
    assert not quantized_modules(model)


@pytest.mark.parametrize("rows", [1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1])
def test_int4_float32_decode_runs_the_kernel(monkeypatch, rows):
    """fp32 decode rows go to the int4 kernel (dequantizing every weight for every token made int4
    ~4x slower than with it). Its float32 result is the dequantized reference to rounding: a
    128-term float32 sum of O(0.1) products, ~1e-6, within rtol = atol = 1e-5."""
    calls = []
    kernel = torch._weight_int4pack_mm_for_cpu
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or kernel(*a))
    lin = linear(k=128, n=64)
    m = Int4Linear.from_linear(lin, 32)
    x = torch.randn(rows, 128)
    assert_close(m(x), nn.functional.linear(x, m.dequantized_weight(), lin.bias), rtol=1e-5, atol=1e-5)
    assert len(calls) == (1 if rows <= INT4_MAX_ROWS else 0)


def test_pack_nibbles_is_row_major_whatever_the_input_strides():
    """A one-block int4 layer (N == the CPU's row block, 64 with AVX-512) went back from PyTorch's
    layout to the nibbles through a transposed view, and smolvlm's kernel refused the result."""
    from smolvlm.quantization.int4 import unpack_nibbles

    q = torch.randint(0, 16, (64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).t()
    p = pack_nibbles(q)
    assert p.is_contiguous() and torch.equal(unpack_nibbles(p), q)
