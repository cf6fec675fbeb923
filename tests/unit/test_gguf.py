"""smolvlm.weights.gguf on tiny GGUF files written here with gguf-py's GGUFWriter.

The tiny files are built the way llama.cpp ``convert_hf_to_gguf.py`` builds a Llama file: HF
names -> GGUF names, q/k rows permuted (``permute_qk``), numpy shapes (out, in). Reading them
back must give the HF tensors again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import gguf
from smolvlm.config import TextConfig
from smolvlm.weights.gguf import (
    EMBED_KEY, HEAD_KEY, GGUFError, GGUFNotFoundError, find_smollm2_gguf, grow_vocab, gguf_vocab,
    permute_qk, read_gguf_text_config, read_gguf_text_model, unpermute_qk,
)

Q = gguf.GGMLQuantizationType
# hidden 64 so every row is a multiple of the 32-wide Q8_0/Q4_1 blocks.
TINY = dict(vocab=32, hidden=64, ff=96, layers=2, heads=2, kv=1, ctx=128)
GG2HF = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _hf_tensors(tie: bool) -> dict[str, torch.Tensor]:
    """A random HF-named tiny Llama state dict."""
    v, h, f, hd = TINY["vocab"], TINY["hidden"], TINY["ff"], TINY["hidden"] // TINY["heads"]
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {EMBED_KEY: r(v, h), "model.text_model.norm.weight": r(h)}
    for i in range(TINY["layers"]):
        p = f"model.text_model.layers.{i}."
        sd.update({p + "input_layernorm.weight": r(h), p + "post_attention_layernorm.weight": r(h),
                   p + "self_attn.q_proj.weight": r(TINY["heads"] * hd, h),
                   p + "self_attn.k_proj.weight": r(TINY["kv"] * hd, h),
                   p + "self_attn.v_proj.weight": r(TINY["kv"] * hd, h), p + "self_attn.o_proj.weight": r(h, h),
                   p + "mlp.gate_proj.weight": r(f, h), p + "mlp.up_proj.weight": r(f, h),
                   p + "mlp.down_proj.weight": r(h, f)})
    sd[HEAD_KEY] = sd[EMBED_KEY].clone() if tie else r(v, h)
    return sd


def _write(path: Path, sd: dict[str, torch.Tensor], *, arch: str = "llama", qtype=Q.F32, tie: bool = True,
           drop: str | None = None, f64: bool = False, blocks: int | None = None) -> Path:
    """Write ``sd`` as llama.cpp would: GGUF names, permuted q/k, optional quantization."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(blocks or TINY["layers"]); w.add_context_length(TINY["ctx"]); w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ff"]); w.add_head_count(TINY["heads"]); w.add_head_count_kv(TINY["kv"])
    w.add_rope_freq_base(100000.0); w.add_layer_norm_rms_eps(1e-5); w.add_vocab_size(TINY["vocab"])
    w.add_tokenizer_model("gpt2"); w.add_token_list([f"t{i}" for i in range(TINY["vocab"])])
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    names = {EMBED_KEY: "token_embd.weight", "model.text_model.norm.weight": "output_norm.weight"}
    if not tie:
        names[HEAD_KEY] = "output.weight"
    for i in range(TINY["layers"]):
        names.update({f"model.text_model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for gg, hf in GG2HF.items()})
    for hf, gg in names.items():
        if gg == drop:
            continue
        t = sd[hf]
        if hf.endswith("q_proj.weight"):
            t = permute_qk(t, TINY["heads"])
        elif hf.endswith("k_proj.weight"):
            t = permute_qk(t, TINY["kv"])
        a = t.numpy().astype(np.float32)
        if f64 and gg == "blk.0.ffn_up.weight":
            w.add_tensor(gg, a.astype(np.float64))  # the writer stores float64 as F64
        elif qtype != Q.F32 and a.ndim == 2:
            w.add_tensor(gg, gguf.quants.quantize(a, qtype), raw_dtype=qtype)  # shape from bytes
        else:
            w.add_tensor(gg, a)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


# -- q/k permutation ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    w = torch.randn(n_head * 64, 40)
    assert_close(unpermute_qk(permute_qk(w, n_head), n_head), w, rtol=0, atol=0)
    assert not torch.equal(permute_qk(w, n_head), w)  # the permutation is not the identity


def test_unpermute_maps_interleaved_rope_to_rotate_half():
    """Why the permutation exists: GGML's Llama RoPE rotates pairs (2j, 2j+1) of a head,
    HF rotates (j, j+d/2). Projecting with the permuted weight and applying GGML RoPE must equal
    HF RoPE on the HF projection, with rows in the permuted order. This fixes the direction of
    ``unpermute_qk`` (its inverse would also pass the round trip above)."""
    n_head, d, pos = 3, 16, 7.0
    w_hf, x = torch.randn(n_head * d, 24), torch.randn(24)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))  # (d/2,)
    cos, sin = torch.cos(pos * inv), torch.sin(pos * inv)

    y = (w_hf @ x).view(n_head, 2, d // 2)  # HF: halves
    a, b = y[:, 0], y[:, 1]
    hf_rot = torch.stack([a * cos - b * sin, b * cos + a * sin], 1).reshape(-1)  # rotate_half RoPE

    yg = (permute_qk(w_hf, n_head) @ x).view(n_head, d // 2, 2)  # GGML: pairs
    a, b = yg[..., 0], yg[..., 1]
    gg_rot = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(-1, 1)  # interleaved RoPE
    assert_close(unpermute_qk(gg_rot, n_head).reshape(-1), hf_rot, rtol=1e-5, atol=1e-5)


# -- reading tiny files ------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_read_f32_roundtrip_exact(tmp_path, tie):
    sd = _hf_tensors(tie)
    cfg, got = read_gguf_text_model(_write(tmp_path / "m.gguf", sd, tie=tie))
    assert cfg == TextConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                             rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=tie,
                             bos_token_id=1, eos_token_id=2, pad_token_id=None)
    assert set(got) == set(sd)
    for k in sd:
        assert got[k].dtype == torch.float32
        assert_close(got[k], sd[k], rtol=0, atol=0, msg=k)
    # the copy of a tied head is its own tensor: training one must not move the other
    assert got[HEAD_KEY].data_ptr() != got[EMBED_KEY].data_ptr()


@pytest.mark.parametrize("qtype,atol", [(Q.Q8_0, 0.03), (Q.Q4_1, 0.5)])
def test_read_quantized(tmp_path, qtype, atol):
    # Bounds: Q8_0 error <= max|block|/254 (~0.016 for N(0,1) blocks of 32); Q4_1 <= range/30 (~0.2).
    sd = _hf_tensors(True)
    _, got = read_gguf_text_model(_write(tmp_path / "q.gguf", sd, qtype=qtype))
    for k in sd:
        assert_close(got[k], sd[k], rtol=0, atol=atol, msg=k)
    ref = gguf.quants.dequantize(gguf.quants.quantize(sd[EMBED_KEY].numpy(), qtype), qtype)
    assert_close(got[EMBED_KEY], torch.from_numpy(ref), rtol=0, atol=0)  # exactly gguf-py's dequantization


def test_vocab_and_config_only(tmp_path):
    p = _write(tmp_path / "m.gguf", _hf_tensors(True))
    assert gguf_vocab(p) == [f"t{i}" for i in range(32)]
    assert read_gguf_text_config(p).num_key_value_heads == 1


# -- bad input ---------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(GGUFNotFoundError, match="not found") as e:
        read_gguf_text_model(tmp_path / "nope.gguf")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_text_model(p)


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated(tmp_path, keep):
    p = _write(tmp_path / "m.gguf", _hf_tensors(True))
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_text_model(p)


def test_unsupported_architecture(tmp_path):
    p = _write(tmp_path / "m.gguf", _hf_tensors(True), arch="qwen2")
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'qwen2'"):
        read_gguf_text_model(p)


def test_unsupported_tensor_type(tmp_path):
    p = _write(tmp_path / "m.gguf", _hf_tensors(True), f64=True)
    with pytest.raises(GGUFError, match=r"unsupported GGUF tensor type.*blk\.0\.ffn_up\.weight \(F64\)"):
        read_gguf_text_model(p)


def test_missing_tensor(tmp_path):
    p = _write(tmp_path / "m.gguf", _hf_tensors(True), drop="blk.1.ffn_down.weight")
    with pytest.raises(GGUFError, match=r"1 missing: model\.text_model\.layers\.1\.mlp\.down_proj\.weight"):
        read_gguf_text_model(p)


def test_more_blocks_than_metadata_says(tmp_path):
    p = _write(tmp_path / "m.gguf", _hf_tensors(True), blocks=1)
    with pytest.raises(GGUFError, match=r"9 unexpected: model\.text_model\.layers\.1\."):
        read_gguf_text_model(p)


# -- the real SmolLM2 file (metadata only: cheap) ----------------------------------------------
def test_find_smollm2_gguf_and_config(ref256):
    p = find_smollm2_gguf()
    assert p.read_bytes()[:4] == b"GGUF"
    import json

    ref = json.loads((ref256 / "config.json").read_text())["text_config"]
    cfg = read_gguf_text_config(p)
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta"):
        assert getattr(cfg, k) == ref[k], k
    # SmolLM2 base vocabulary; SmolVLM adds 128 rows (grow_vocab)
    assert cfg.vocab_size == 49152 and ref["vocab_size"] == 49280
    assert cfg.tie_word_embeddings


# -- grow_vocab --------------------------------------------------------------------------------
def test_grow_vocab_mean_rows():
    sd = _hf_tensors(False)
    out = grow_vocab(sd, 40)
    for k in (EMBED_KEY, HEAD_KEY):
        assert out[k].shape == (40, 64)
        assert_close(out[k][:32], sd[k], rtol=0, atol=0)
        assert_close(out[k][32:], sd[k].mean(0).expand(8, -1), rtol=0, atol=0)
    assert out["model.text_model.norm.weight"] is sd["model.text_model.norm.weight"]
    assert sd[EMBED_KEY].shape == (32, 64)  # input untouched
    assert_close(grow_vocab(sd, 40, init="zeros")[HEAD_KEY][32:], torch.zeros(8, 64), rtol=0, atol=0)


def test_grow_vocab_to_smolvlm_size_and_errors():
    sd = {EMBED_KEY: torch.randn(49152, 4)}  # tied checkpoint without lm_head
    out = grow_vocab(sd, 49280)
    assert set(out) == {EMBED_KEY} and out[EMBED_KEY].shape == (49280, 4)
    assert grow_vocab(sd, 49152)[EMBED_KEY].shape == (49152, 4)
    with pytest.raises(ValueError, match="cannot shrink"):
        grow_vocab(sd, 100)
    with pytest.raises(ValueError, match="init must be"):
        grow_vocab(sd, 49280, init="random")
