"""Weight-only quantization: error bounds per layer, greedy agreement, save/load round trip.

Bounds. int8 rounds w/scale to the nearest integer, so |w - w_hat| <= scale/2 per row exactly (a
1e-6 relative slack for float32 arithmetic); int4 likewise per group with its own scale. Kernel
paths (bf16 activations) are compared with the fp32 dequantized reference at bf16 tolerance:
rtol = atol = 2e-2, a few bf16 ulps (2^-8 = 3.9e-3) on O(1) outputs after a 64..128-term sum.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from smolvlm import SmolVLM
from smolvlm.generation.generate import generate_ids
from smolvlm.quantization import (Int4Linear, Int8Linear, QuantizationError, load_quantized, quantize,
                                  quantized_modules, save_quantized)
from smolvlm.quantization.int4 import pack_nibbles, quantize_int4, unpack_nibbles
from smolvlm.quantization.int8 import KERNEL_MAX_ROWS
from tests.helpers import tiny_config

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


@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS + 1])
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
    with pytest.raises(QuantizationError, match="not quantized"):
        save_quantized(model, "/tmp/never-written")


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
    d = save_quantized(q, tmp_path / "q")
    assert (d / "quantization.json").is_file()
    back = load_quantized(d)
    ids = torch.tensor([[5, 299, 299, 299, 299, 7, 8]])
    pv = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        want = q(input_ids=ids, pixel_values=pv).logits
        got = back(input_ids=ids, pixel_values=pv).logits
    assert torch.equal(want, got)
    again = SmolVLM.from_pretrained(d)  # from_pretrained recognises the quantized folder
    assert type(again.lm_head) is type(q.lm_head)
    with pytest.raises(QuantizationError, match="cannot load it as"):
        SmolVLM.from_pretrained(d, quantize="int4" if mode == "int8" else "int8")
    with torch.no_grad():  # bf16 load of the same folder runs the kernel path
        bf = load_quantized(d, dtype=torch.bfloat16)
        assert_close(bf(input_ids=ids, pixel_values=pv).logits.float(), want, **BF16_TOL)


def test_from_pretrained_quantize_flag(tmp_path):
    d = tmp_path / "ckpt"
    SmolVLM.from_config(tiny_config()).save_pretrained(d)
    m = SmolVLM.from_pretrained(d, quantize="int8")
    assert isinstance(m.model.text_model.layers[0].self_attn.q_proj, Int8Linear)
    with pytest.raises(QuantizationError):
        SmolVLM.from_pretrained(d, quantize="fp8")


def test_load_quantized_missing_description(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantization.json"):
        load_quantized(tmp_path)


def test_cli_quantize_flag():
    import argparse

    from smolvlm.cli import common

    p = argparse.ArgumentParser()
    common.add_model_args(p)
    assert p.parse_args(["--model", "x", "--quantize", "int8"]).quantize == "int8"
    assert p.parse_args(["--model", "x"]).quantize == "none"
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "x", "--quantize", "int3"])
