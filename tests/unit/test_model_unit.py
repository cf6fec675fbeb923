"""Model internals: KV cache vs full recompute, masks, pixel shuffle order, norms, merge, init, API.

Cache-vs-recompute tolerance: rtol = atol = 1e-5 in fp32. Both paths use SDPA on the same
weights; they differ only in how many (masked) key slots enter the reduction and in the fused
causal kernel vs an explicit boolean mask, i.e. summation order (~1e-7 on O(1) logits).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.testing import assert_close

from smolvlm import SmolVLM
from smolvlm.model.connector import pixel_shuffle
from smolvlm.model.kv_cache import KVCache
from smolvlm.model.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq, rope_tables, rotate_half
from tests.helpers import tiny_config

IMG, S = 299, 4
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model() -> SmolVLM:
    torch.manual_seed(0)
    return SmolVLM.from_config(tiny_config("smolvlm"))


def batch():
    """Two left-padded prompts (3 pads on row 0), one image each, 14 slots."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 290, (2, 14), generator=g)
    ids[0, :3] = 2
    ids[0, 5:5 + S] = IMG
    ids[1, 2:2 + S] = IMG
    am = torch.ones_like(ids)
    am[0, :3] = 0
    pv = torch.randn(2, 1, 3, 32, 32, generator=g)
    return ids, am, pv


@torch.no_grad()
def test_kv_cache_prefill_then_decode_equals_recompute(model):
    ids, am, pv = batch()
    new = torch.randint(3, 290, (2, 4), generator=torch.Generator().manual_seed(2))
    full_ids = torch.cat([ids, new], 1)
    full_am = torch.cat([am, torch.ones_like(new)], 1)
    pos = (full_am.cumsum(1) - 1).clamp(min=0)  # generation-style positions for left padding
    full = model(input_ids=full_ids, attention_mask=full_am, pixel_values=pv, position_ids=pos).logits

    cache = model.new_kv_cache(2, max_len=32)
    t = ids.shape[1]
    out = model(input_ids=ids, attention_mask=am, pixel_values=pv, position_ids=pos[:, :t],
                kv_cache=cache, input_pos=torch.arange(t), logits_to_keep=1).logits
    steps = [out[:, -1]]
    for i in range(new.shape[1] - 1):
        slot = t + i
        out = model(input_ids=new[:, i:i + 1], attention_mask=full_am[:, :slot + 1], position_ids=pos[:, slot:slot + 1],
                    kv_cache=cache, input_pos=torch.tensor([slot])).logits
        steps.append(out[:, -1])
    real_last = torch.stack(steps, 1)  # logits predicting tokens t .. t+3
    assert_close(real_last, full[:, t - 1:t + 3], **TOL)


@torch.no_grad()
def test_chunked_prefill_and_image_features_cache(model):
    ids, am, pv = batch()
    full = model(input_ids=ids, attention_mask=am, pixel_values=pv).logits
    feats = model.get_image_features(pv)
    assert feats.shape == (2, S, 64)
    cache = model.new_kv_cache(2, max_len=20)
    # Chunk 1 holds both images; chunk 2 is plain text: slots 0..9 then 10..13.
    a = model(input_ids=ids[:, :10], attention_mask=am[:, :10], image_features=feats, kv_cache=cache,
              input_pos=torch.arange(10)).logits
    b = model(input_ids=ids[:, 10:], attention_mask=am, kv_cache=cache, input_pos=torch.arange(10, 14)).logits
    real = am.bool()
    assert_close(torch.cat([a, b], 1)[real], full[real], **TOL)
    assert torch.isfinite(a).all()  # left-padding queries see only themselves, never NaN


@torch.no_grad()
def test_cache_without_mask_defaults(model):
    ids = torch.randint(3, 290, (1, 6))
    full = model(input_ids=ids).logits
    cache = model.new_kv_cache(1, max_len=8)
    model(input_ids=ids[:, :5], kv_cache=cache, input_pos=torch.arange(5))
    last = model(input_ids=ids[:, 5:], kv_cache=cache, input_pos=torch.tensor([5])).logits
    assert_close(last[:, -1], full[:, -1], **TOL)


def test_cache_errors(model):
    cache = model.new_kv_cache(1, max_len=4)
    assert (cache.batch_size, cache.max_len, len(cache)) == (1, 4, 2)
    assert cache.k[0].shape == (1, 2, 4, 16) and cache.dtype == torch.float32
    with pytest.raises(ValueError, match="KV cache overflow: writing slots 3..4.*max_len=4"):
        model(input_ids=torch.ones(1, 2, dtype=torch.long), kv_cache=cache, input_pos=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="needs input_pos"):
        model(input_ids=torch.ones(1, 2, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="batch size 1"):
        model(input_ids=torch.ones(2, 1, dtype=torch.long), kv_cache=cache, input_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match="at least input_pos"):
        model(input_ids=torch.ones(1, 1, dtype=torch.long), kv_cache=cache, input_pos=torch.tensor([2]),
              attention_mask=torch.ones(1, 2))


def test_kv_cache_update_and_reset():
    c = KVCache(n_layers=1, batch_size=2, n_kv_heads=3, max_len=5, head_dim=4)
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    ka, va = c.update(0, torch.tensor([1, 2]), k, v)
    assert ka.shape == (2, 3, 5, 4)
    assert torch.equal(ka[:, :, 1:3], k) and torch.equal(va[:, :, 1:3], v) and not ka[:, :, 0].any()
    c.reset()
    assert not c.k[0].any() and not c.v[0].any()


def test_pixel_shuffle_channel_order():
    """Token (I, J) = concat over a (outer), b (inner) of grid cell (I*s+a, J*s+b) (SPEC 1.5)."""
    n, s, d = 6, 3, 2
    x = torch.randn(1, n * n, d)
    grid = x.view(n, n, d)
    out = pixel_shuffle(x, s)
    assert out.shape == (1, 4, s * s * d)
    for i in range(n // s):
        for j in range(n // s):
            want = torch.cat([grid[i * s + a, j * s + b] for a in range(s) for b in range(s)])
            assert torch.equal(out[0, i * (n // s) + j], want)
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.randn(1, 12, 2), 2)


def test_rmsnorm_casts_before_weight():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
    norm = norm.to(torch.bfloat16)
    x = torch.randn(3, 8).to(torch.bfloat16)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(norm(x), norm.weight * h.to(torch.bfloat16))


def test_rope_halves_and_theta():
    x = torch.arange(8.0)
    assert torch.equal(rotate_half(x), torch.tensor([-4.0, -5, -6, -7, 0, 1, 2, 3]))
    inv = rope_inv_freq(8, 100000.0)
    assert_close(inv, torch.tensor([1.0, 100000.0 ** -0.25, 100000.0 ** -0.5, 100000.0 ** -0.75]))
    cos, sin = rope_cos_sin(torch.tensor([[3]]), inv, torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and cos.shape == (1, 1, 8)
    assert torch.equal(cos[..., :4], cos[..., 4:])  # frequencies concatenated twice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_by_roll_is_the_reference_rotation_bit_for_bit(dtype):
    """``apply_rope`` (roll + signed sin, q and k heads in one call) against the reference's
    ``x * cos + rotate_half(x) * sin`` on the (B, H, T, hd) layout: exactly equal (negation is exact)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g).to(dtype)  # (B, T, H, hd)
    cos, sin = rope_cos_sin(torch.tensor([[0, 1, 2, 7, 40], [3, 4, 5, 6, 9]]), rope_inv_freq(8, 10000.0), dtype)
    want = x.transpose(1, 2) * cos[:, None] + rotate_half(x.transpose(1, 2)) * sin[:, None]  # (B, H, T, hd)
    assert torch.equal(apply_rope(x, *rope_tables(cos, sin)).transpose(1, 2), want)


def test_cache_slice_write_equals_index_write():
    """``KVCache.update`` with ``start`` (consecutive slots: one slice copy, cast included) stores
    what the index path stores."""
    k, v = torch.randn(2, 2, 3, 4).bfloat16(), torch.randn(2, 2, 3, 4).bfloat16()
    a, b = KVCache(1, 2, 2, 8, 4), KVCache(1, 2, 2, 8, 4)
    a.update(0, torch.tensor([4, 5, 6]), k, v)
    b.update(0, torch.tensor([4, 5, 6]), k, v, start=4)
    assert torch.equal(a.k[0], b.k[0]) and torch.equal(a.v[0], b.v[0]) and a.k[0][:, :, 4:7].abs().sum() > 0


@torch.no_grad()
def test_merge_order_and_count_error(model):
    ids = torch.tensor([[IMG] * S + [5], [6] + [IMG] * S])
    feats = torch.randn(2, S, 64)
    emb = model.embed_inputs(ids, feats)
    assert torch.equal(emb[0, :S], feats[0]) and torch.equal(emb[1, 1:], feats[1])
    assert torch.equal(emb[0, S], model.model.text_model.embed_tokens.weight[5])
    with pytest.raises(ValueError, match=f"{2 * S} <image> tokens.*{S} feature rows"):
        model.embed_inputs(ids, feats[:1])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, pixel_values=torch.randn(1, 1, 3, 32, 32), image_features=feats)


def test_from_config_init_and_tie():
    m = SmolVLM.from_config(tiny_config(tie=True), dtype=torch.bfloat16)
    assert m.lm_head.weight is m.model.text_model.embed_tokens.weight
    assert m.dtype == torch.bfloat16
    assert torch.equal(m.model.text_model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert not m.model.vision_model.encoder.layers[0].mlp.fc1.bias.any()
    w = m.model.text_model.layers[0].mlp.up_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002
    assert not any(p.is_meta for p in m.parameters())


def test_generate_delegates_lazily(model, monkeypatch):
    fake = types.ModuleType("smolvlm.generation.generate")
    fake.generate_ids = lambda m, **kw: ("called", m, kw)
    monkeypatch.setitem(sys.modules, "smolvlm.generation.generate", fake)
    assert model.generate(max_new_tokens=3) == ("called", model, {"max_new_tokens": 3})


@torch.no_grad()
def test_image_features_one_encoder_layer_per_step_are_get_image_features(model):
    """``image_feature_steps`` (the server encodes a newcomer's tiles this way between decode steps) runs
    the same modules in the same order as ``get_image_features``: one None per encoder layer but the last
    per chunk of tiles, then the same features bit for bit, padding tiles dropped and the pixel mask
    applied alike; a bad shape fails at the first step."""
    g = torch.Generator().manual_seed(3)
    pv = torch.randn(2, 3, 3, 32, 32, generator=g)
    pv[1, 2] = 0  # a padding tile
    pm = torch.ones(2, 3, 32, 32, dtype=torch.bool)
    pm[0, 1, :, 20:] = False  # a tile with padded patches
    n_layers = model.config.vision_config.num_hidden_layers
    for chunk in (1, None):
        model.vision_chunk_size = chunk
        steps = list(model.image_feature_steps(pv, pm))
        n_chunks = 5 if chunk == 1 else 1
        assert len(steps) == n_chunks * (n_layers - 1) + 1 and all(s is None for s in steps[:-1])
        assert torch.equal(steps[-1], model.get_image_features(pv, pm)) and steps[-1].shape[0] == 5
    model.vision_chunk_size = 1
    flat = pv[0]
    layers = list(model.model.vision_model.layerwise(flat))
    assert len(layers) == n_layers and torch.equal(layers[-1], model.model.vision_model(flat))
    with pytest.raises(ValueError, match="pixel_values must be"):
        next(model.image_feature_steps(pv[0]))
