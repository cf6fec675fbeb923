"""Every speed path against the slow path it replaces (STYLE habit 6).

fp32 comparisons use rtol = atol = 1e-5 (same weights, only the SDPA kernel / summation order
differs: ~1e-7 on O(1) values). bf16 comparisons use 2e-2: a few bf16 ulps (3.9e-3 at 1.0).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.testing import assert_close

from smolvlm import SmolVLM, cpu, kernels
from smolvlm.generation.generate import generate_ids
from smolvlm.model import text as text_mod
from smolvlm.model import vlm as vlm_mod
from smolvlm.model.layers import attention, cpu_attends_fast_in
from smolvlm.model.vision import key_padding_mask
from smolvlm.processing.image import ImageProcessorConfig, TileBudget, plan_layout
from tests.helpers import tiny_config

TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def model() -> SmolVLM:
    torch.manual_seed(0)
    return SmolVLM.from_config(tiny_config("smolvlm"))


def _always_masked(slots, key_len, key_valid):
    return text_mod.build_mask(slots, key_len, key_valid), False


@torch.no_grad()
def test_cache_fast_masks_equal_explicit_masks(model, monkeypatch):
    """No-mask decode and is_causal prefill (and reuse of the fresh k/v) == explicit boolean masks."""
    ids = torch.randint(3, 290, (1, 9), generator=torch.Generator().manual_seed(3))

    def run() -> torch.Tensor:
        cache = model.new_kv_cache(1, 12)
        out = [model(input_ids=ids, kv_cache=cache, input_pos=torch.arange(9)).logits]
        for p in (9, 10):
            out.append(model(input_ids=ids[:, p - 9 : p - 8], attention_mask=torch.ones(1, p + 1, dtype=torch.long),
                             kv_cache=cache, input_pos=torch.tensor([p])).logits)
        return torch.cat(out, 1)

    assert text_mod._cache_mask(torch.arange(9), 9, None) == (None, True)
    assert text_mod._cache_mask(torch.tensor([9]), 10, torch.ones(1, 10)) == (None, False)
    assert text_mod._cache_mask(torch.tensor([9]), 10, torch.tensor([[0] + [1] * 9]))[0] is not None
    fast = run()
    monkeypatch.setattr(text_mod, "_cache_mask", _always_masked)
    assert_close(fast, run(), **TOL)


def test_bf16_single_query_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 37, 16, generator=g).bfloat16() for _ in range(2))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)  # (B, H, 1, hd)
    got = attention(q, k, v)  # (B, 1, H*hd), bf16 SDPA over a bf16 cache
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), ref.transpose(1, 2).reshape(2, 1, 64), **BF16_TOL)
    # an fp32 cache (what new_kv_cache gives bf16 models on CPUs slow at bf16 SDPA) is attended in
    # fp32 as it is, not cast down: exactly the fp32 result, rounded once
    assert torch.equal(attention(q, k.float(), v.float()), ref.transpose(1, 2).reshape(2, 1, 64).bfloat16())
    # with a mask as well (the compiled decode step's static cache, per-row decode): still fp32, rounded
    # once, never the whole cache cast to bf16 for a bf16 SDPA (~4x slower per layer on an AVX2 EPYC)
    mask = torch.arange(37)[None, None, None, :] < torch.tensor([30, 37])[:, None, None, None]  # (B, 1, 1, L)
    masked = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert torch.equal(attention(q, k.float(), v.float(), mask), masked.transpose(1, 2).reshape(2, 1, 64).bfloat16())
    assert not torch.equal(masked, ref)  # the mask mattered


def test_kv_cache_dtype_follows_the_cpus_bf16_attention_speed(model, monkeypatch):
    """bf16 models get a bf16 cache (as the reference) where this CPU attends fast in bf16 (AMX, or
    smolvlm's decode attention kernel), an fp32 one where it does not (neither; fp16 models
    everywhere); fp32 models an fp32 one."""
    bf = SmolVLM.from_config(model.config, dtype=torch.bfloat16)
    native = cpu.has("amx_tile") or kernels.ready("decode_attention")
    assert cpu_attends_fast_in(torch.bfloat16) == native and cpu_attends_fast_in(torch.float32)
    assert not cpu_attends_fast_in(torch.float16)
    assert bf.new_kv_cache(1, 4).dtype == (torch.bfloat16 if native else torch.float32)
    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):  # both policies, whatever this CPU is
        monkeypatch.setattr(vlm_mod, "cpu_attends_fast_in", lambda dtype, fast=fast: fast)
        assert bf.new_kv_cache(1, 4).dtype == want
        assert model.new_kv_cache(1, 4).dtype == torch.float32


def test_bf16_attends_fast_with_amx_or_smolvlms_bf16_kernels(monkeypatch):
    """The policy on each kind of CPU, whatever this one is: AMX yes; without AMX yes when smolvlm's
    decode attention kernel runs, with or without its bf16 attention kernel (AVX-512 BF16 or AVX2
    only: prompts of more than one query are as fast in bf16 either way); kernels off (or no
    compiler), no; fp16 never."""
    from smolvlm.model import layers

    monkeypatch.setattr(layers.cpu, "has", lambda flag: False)
    for use, bf16_kernel, want in ((None, None, True), (None, "this CPU lacks AVX-512 BF16", True),
                                   ("SMOLVLM_CPU_KERNELS=0", None, False), ("no C++ compiler", None, False)):
        monkeypatch.setattr(kernels, "_state", {"use": use, "gemv": use, "bf16_attention": bf16_kernel or use})
        assert cpu_attends_fast_in(torch.bfloat16) == want and not cpu_attends_fast_in(torch.float16)
    monkeypatch.setattr(layers.cpu, "has", lambda flag: flag == "amx_tile")
    assert cpu_attends_fast_in(torch.bfloat16)


@torch.no_grad()
def test_bf16_model_with_fp32_or_bf16_cache_gives_same_tokens(model):
    bf = SmolVLM.from_config(model.config, dtype=torch.bfloat16)
    bf.load_state_dict(model.state_dict())
    assert bf.new_kv_cache(1, 4, dtype=torch.bfloat16).dtype == torch.bfloat16
    ids = torch.randint(3, 290, (1, 8), generator=torch.Generator().manual_seed(4))
    cache32 = bf.new_kv_cache(1, 11)
    cache16 = bf.new_kv_cache(1, 11, dtype=torch.bfloat16)
    a = bf(input_ids=ids, kv_cache=cache32, input_pos=torch.arange(8)).logits
    b = bf(input_ids=ids, kv_cache=cache16, input_pos=torch.arange(8)).logits
    assert torch.equal(a, b)  # prefill: the stored values are exactly the bf16 k/v either way
    assert torch.equal(cache32.k[0].bfloat16(), cache16.k[0])
    # decode: fp32 attention over the fp32 cache vs bf16 SDPA over a bf16 cache (same fed tokens)
    for p in (8, 9, 10):
        a = bf(input_ids=ids[:, p - 8 : p - 7], kv_cache=cache32, input_pos=torch.tensor([p])).logits
        b = bf(input_ids=ids[:, p - 8 : p - 7], kv_cache=cache16, input_pos=torch.tensor([p])).logits
        assert_close(a.float(), b.float(), **BF16_TOL)
    out = generate_ids(bf, ids, max_new_tokens=3, eos_token_id=[])  # and generation runs end to end
    assert out.shape == (1, 11)


@torch.no_grad()
def test_vision_without_mask_when_all_patches_valid(model):
    full = torch.ones(2, 4, 4, dtype=torch.bool)
    assert key_padding_mask(full) is None
    part = full.clone()
    part[1, 3:] = False
    assert key_padding_mask(part).shape == (2, 1, 1, 16)
    vm = model.model.vision_model
    x = vm.embeddings(torch.randn(2, 3, 32, 32), full)
    assert_close(vm.encoder(x, None), vm.encoder(x, full.reshape(2, 1, 1, 16)), **TOL)


def _cfg256() -> ImageProcessorConfig:
    return ImageProcessorConfig(longest_edge=2048, max_image_size=512)


def test_tile_budget_default_is_reference_layout():
    cfg = _cfg256()
    for h, w in [(512, 512), (1024, 1536), (200, 300), (3000, 4000)]:
        assert plan_layout(h, w, cfg, True) == plan_layout(h, w, cfg, True, None)
        assert plan_layout(h, w, cfg, True, TileBudget()) == plan_layout(h, w, cfg, True)


def test_tile_budget_no_upscale_and_max_tiles():
    cfg = _cfg256()
    assert plan_layout(512, 512, cfg, True).num_arrays == 17  # reference: 4x4 + global
    small = plan_layout(512, 512, cfg, True, TileBudget(no_upscale=True))
    assert small.num_arrays == 1 and small.resized == (512, 512)
    mid = plan_layout(1024, 1536, cfg, True, TileBudget(no_upscale=True))
    assert (mid.rows, mid.cols) == (2, 3)
    big = plan_layout(3000, 4000, cfg, True, TileBudget(no_upscale=True))
    assert big == plan_layout(3000, 4000, cfg, True)  # larger than L: unchanged
    for n in (1, 2, 4, 6):
        lay = plan_layout(3000, 4000, cfg, True, TileBudget(max_tiles=n))
        assert max(lay.rows * lay.cols, 1) <= n
    with pytest.raises(ValueError, match="max_tiles"):
        TileBudget(max_tiles=0)


def test_processor_tile_budget_pass_through(ref256):
    from smolvlm.processing.processor import SmolVLMProcessor

    proc = SmolVLMProcessor.from_pretrained(ref256)
    img = Image.new("RGB", (512, 512), (120, 30, 200))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True)
    default, cheap = proc(text=text, images=[img]), proc(text=text, images=[img], no_upscale=True)
    assert default["pixel_values"].shape[1] == 17 and cheap["pixel_values"].shape[1] == 1
    counted = proc.count_tokens(text, [img], no_upscale=True)
    assert counted["total_tokens"] == cheap["input_ids"].shape[1] < default["input_ids"].shape[1]
    assert (cheap["input_ids"] == proc.image_token_id).sum() == proc.image_seq_len
