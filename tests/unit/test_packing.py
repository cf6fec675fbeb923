"""Sequence packing (``data.packing``): packed rows compute what the samples compute one by one.

Tolerances (float32). A packed sample runs through exactly the same operations as alone, with the
same RoPE positions (cos/sin are elementwise in the position), and its masked keys get softmax weight
exactly 0. What differs is only the summation order: the fused causal SDPA kernel (alone) vs the
explicit boolean-mask kernel (packed), GEMMs over a different number of rows (another blocking), the
vision tower over all tiles at once, and the loss summed over another set of tokens. Each is a few
float32 ulps (~1e-7 relative) per op. Measured (this tiny config, 7 samples in 4 rows): logits
max |diff| 1.8e-7 (|logit| <= 0.7), summed loss 9e-8 relative, gradients max |diff| 2.4e-6 on
entries up to 5 (embedding / head; relative norm of the difference ~3e-7). We assert logits at
1e-5 / 1e-5 (the fp32 parity tolerance of ``tests/parity/test_model_parity.py``, 50x the measured),
the summed loss at rtol 1e-5 (100x), gradients at rtol 1e-4 and atol 1e-5 x the tensor's largest
entry (an entry of the embedding / head gradient sums over every token of the batch, so its
rounding scales with the tensor's magnitude, not the entry's; >= 20x the measured). A real leak (a
token seeing another sample, a wrong position, a boundary target) changes logits by ~1e-1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from smolvlm.model.text import segment_mask, segment_positions
from smolvlm.model.vlm import SmolVLM
from smolvlm.training import sft
from smolvlm.training.build import build_run, run_recipe
from smolvlm.training.collate import IGNORE_INDEX, CollateError, collate
from smolvlm.training.packing import pack_collate, plan_packing
from smolvlm.training.recipe import RecipeError, recipe_from_dict
from tests.helpers import make_image, tiny_config, tiny_recipe

IMG, S = 299, 4  # tiny_config: image token id, tokens per 32 px image ((32 // 8)^2 / 2^2)
PAD = 2
LOGITS = dict(rtol=1e-5, atol=1e-5)
GRAD_RTOL, GRAD_ATOL_SCALE = 1e-4, 1e-5  # atol = GRAD_ATOL_SCALE * max |grad| of the tensor


def model() -> SmolVLM:
    torch.manual_seed(0)
    m = SmolVLM.from_config(tiny_config())
    m.vision_chunk_size = None  # as training runs it (build._configure)
    return m.train()


def pixels(seed: int) -> torch.Tensor:
    """One 32 px tile (3, 32, 32) from ``make_image``, normalised to [-1, 1]."""
    a = np.asarray(make_image(32, 32, seed), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0


def sample(length: int, n_images: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """An encoded sample: random text, ``n_images`` blocks of S image tokens, the second half trained."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMG - 1, (length,), generator=g)
    for k in range(n_images):
        ids[1 + k * (S + 1): 1 + k * (S + 1) + S] = IMG
    labels = ids.clone()
    labels[: max(length // 2, n_images * (S + 1) + 1)] = IGNORE_INDEX
    out = {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels}
    if n_images:
        out["pixel_values"] = torch.stack([pixels(seed * 10 + k) for k in range(n_images)])
        out["pixel_attention_mask"] = torch.ones(n_images, 32, 32, dtype=torch.long)
    return out


def samples(images: bool) -> list[dict[str, torch.Tensor]]:
    spec = [(13, 1), (7, 0), (22, 2), (5, 0), (30, 1), (9, 0), (16, 1)] if images else \
           [(13, 0), (7, 0), (22, 0), (5, 0), (30, 0), (9, 0), (16, 0)]
    return [sample(n, k, seed=i) for i, (n, k) in enumerate(spec)]


def grads(m: SmolVLM) -> dict[str, torch.Tensor]:
    names = ["model.text_model.embed_tokens.weight", "model.text_model.layers.0.self_attn.q_proj.weight",
             "model.text_model.layers.1.mlp.down_proj.weight", "lm_head.weight",
             "model.connector.modality_projection.proj.weight",
             "model.vision_model.embeddings.patch_embedding.weight"]
    params = dict(m.named_parameters())
    return {n: params[n].grad.clone() for n in names if params[n].grad is not None}


# -- the plan -------------------------------------------------------------------------------------
def test_plan_is_first_fit_in_data_order():
    # room after each: row0 10-5=5, row1 10-8=2, row0 5-3=2, [12 > 10: own row], row0 2-2=0, row3 (4)
    assert plan_packing([5, 8, 3, 12, 2, 4], 10) == [[0, 2, 4], [1], [3], [5]]
    assert plan_packing([10, 1], 10) == [[0], [1]]  # exactly full
    assert plan_packing([11, 1, 1], 10) == [[0], [1, 2]]  # nothing joins an over-long sample
    g = np.random.default_rng(0)
    for _ in range(50):
        lengths = g.integers(1, 40, size=int(g.integers(1, 20))).tolist()
        rows = plan_packing(lengths, 32)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # each sample once
        for r in rows:
            assert r == sorted(r)  # data order inside a row
            assert sum(lengths[i] for i in r) <= 32 or len(r) == 1  # over max_length only alone
        # first fit: no sample could have gone to an earlier row
        room = [32] * len(rows)
        where = {i: k for k, r in enumerate(rows) for i in r}
        for i, n in enumerate(lengths):
            assert all(room[k] < n for k in range(where[i])), (lengths, rows)
            room[where[i]] -= n


def test_pack_collate_layout():
    ss = samples(images=True)
    batch = pack_collate(ss, pad_token_id=PAD, max_length=32, image_token_id=IMG)
    # plan for lengths [13, 7, 22, 5, 30, 9, 16] at 32: [0, 1, 3] (25), [2, 5] (31), [4], [6]
    assert plan_packing([13, 7, 22, 5, 30, 9, 16], 32) == [[0, 1, 3], [2, 5], [4], [6]]
    assert batch["input_ids"].shape == (4, 31)
    row0 = [ss[0], ss[1], ss[3]]
    assert batch["segment_ids"][0].tolist() == [1] * 13 + [2] * 7 + [3] * 5 + [0] * 6
    assert batch["position_ids"][0].tolist() == [*range(13), *range(7), *range(5)] + [0] * 6
    seg = batch["segment_ids"]
    assert torch.equal(batch["position_ids"], segment_positions(seg).masked_fill(seg == 0, 0))
    assert torch.equal(batch["input_ids"][0, :25], torch.cat([s["input_ids"] for s in row0]))
    assert batch["input_ids"][0, 25:].eq(PAD).all() and batch["attention_mask"][0, 25:].eq(0).all()
    # each sample's first label is masked; the others are the sample's own
    for start, s in zip([0, 13, 20], row0):
        assert batch["labels"][0, start] == IGNORE_INDEX
        assert torch.equal(batch["labels"][0, start + 1: start + len(s["labels"])], s["labels"][1:])
    # the targets (LMLoss's weight) are exactly the unpacked samples' targets
    weight = sft.LMLoss(torch.nn.Identity()).weight
    assert weight(batch) == sum(weight(collate([s], PAD)) for s in ss)
    # images: a row's are its samples' in order (row 1: sample 2's two, then none from sample 5), zero padding after
    pv = batch["pixel_values"]
    assert pv.shape == (4, 2, 3, 32, 32)
    assert torch.equal(pv[0, 0], ss[0]["pixel_values"][0]) and pv[0, 1].eq(0).all()
    assert torch.equal(pv[1], ss[2]["pixel_values"])
    assert torch.equal(pv[2, 0], ss[4]["pixel_values"][0]) and torch.equal(pv[3, 0], ss[6]["pixel_values"][0])
    assert batch["pixel_attention_mask"][0, 1].eq(0).all() and batch["pixel_attention_mask"][1].eq(1).all()


def test_pack_collate_truncates_and_needs_max_length():
    long = sample(40, 1, seed=3)
    batch = pack_collate([long, sample(5, seed=4)], PAD, max_length=32, image_token_id=IMG)
    assert batch["segment_ids"].tolist() == [[1] * 32, [1] * 5 + [0] * 27]  # truncated, alone in its row
    with pytest.raises(CollateError, match="max_length"):
        pack_collate([long], PAD)
    with pytest.raises(CollateError, match="inside an image"):
        pack_collate([sample(12, 2, seed=5)], PAD, max_length=8, image_token_id=IMG)


def test_segment_mask_is_block_diagonal_causal():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = segment_mask(seg)[0, 0]
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [0, 0, 1, 0, 0, 0],
                         [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # padding sees only itself (no NaN)
    assert torch.equal(m, want)
    assert segment_positions(seg).tolist() == [[0, 1, 0, 1, 2, 0]]


# -- packed == unpacked ------------------------------------------------------------------------------
@pytest.mark.parametrize("images", [False, True])
def test_packed_loss_and_grads_equal_unpacked(images):
    """Summed loss and gradients of a packed batch == the sum over the samples run one by one,
    through ``LMLoss`` as training calls it (``return_logits=False``, weighted by target tokens)."""
    m, ss = model(), samples(images)
    loss_fn = sft.LMLoss(m)
    packed = pack_collate(ss, PAD, max_length=32, image_token_id=IMG)
    assert packed["input_ids"].shape[0] < len(ss)
    m.zero_grad()
    loss, _ = loss_fn(m, packed)
    packed_sum = loss * loss_fn.weight(packed)
    packed_sum.backward()
    g_packed = grads(m)

    m.zero_grad()
    alone_sum = torch.zeros(())
    for s in ss:
        b = collate([s], PAD, image_token_id=IMG)
        n = loss_fn.weight(b)
        if n:
            part = loss_fn(m, b)[0] * n
            part.backward()
            alone_sum = alone_sum + part.detach()
    g_alone = grads(m)

    assert_close(packed_sum.detach(), alone_sum, rtol=1e-5, atol=0)
    assert set(g_packed) == set(g_alone) and len(g_packed) == (6 if images else 4)
    for n in g_packed:
        atol = GRAD_ATOL_SCALE * float(g_alone[n].abs().max())
        assert_close(g_packed[n], g_alone[n], rtol=GRAD_RTOL, atol=atol, msg=n)


@pytest.mark.parametrize("images", [False, True])
def test_packed_logits_equal_unpacked(images):
    m, ss = model(), samples(images)
    packed = pack_collate(ss, PAD, max_length=32, image_token_id=IMG)
    rows = plan_packing([len(s["input_ids"]) for s in ss], 32)
    kw = {k: v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        logits = m(**kw).logits  # (R, T, V)
        for r, idx in enumerate(rows):
            start = 0
            for i in idx:
                s, n = ss[i], len(ss[i]["input_ids"])
                alone = m(**{k: v for k, v in collate([s], PAD).items() if k != "labels"}).logits[0]
                assert_close(logits[r, start:start + n], alone, **LOGITS)
                start += n
        # the explicit positions equal the default ones derived from segment_ids
        assert torch.equal(m(**{k: v for k, v in kw.items() if k != "position_ids"}).logits, logits)


def test_segment_ids_are_only_for_training_forwards():
    m = model().eval()
    ids = torch.randint(3, 200, (1, 6))
    with pytest.raises(ValueError, match="kv_cache"):
        m(input_ids=ids, segment_ids=torch.ones(1, 6, dtype=torch.long), kv_cache=m.new_kv_cache(1, 8),
          input_pos=torch.arange(6))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        m(input_ids=ids, segment_ids=torch.ones(1, 5, dtype=torch.long))


# -- the recipe ------------------------------------------------------------------------------------
def _packing_recipe(ref, out, **data) -> dict:
    r = tiny_recipe(ref, out, max_steps=2, batch_size=4, grad_accum=1, shuffle=False, eval_every=0,
                    checkpoint_every=0)
    r["data"] = {"n_train": 4, "n_eval": 0, "seed": 0, "packing": True, **data}
    r["lora"] = {"enabled": False}
    r["freeze"] = {"freeze": [], "train": []}
    r["optim"] = {"lr": 3e-3, "weight_decay": 0.0}
    r["schedule"] = {"kind": "constant", "warmup_steps": 0}
    return r


def test_packing_without_max_length_is_a_recipe_error(ref256, tmp_path):
    out = tmp_path / "run"
    recipe = recipe_from_dict(_packing_recipe(ref256, out))
    with pytest.raises(RecipeError, match="max_length"):
        run_recipe(recipe)
    with pytest.raises(RecipeError, match="max_length"):
        build_run(recipe)
    assert not out.exists()


def test_two_packed_training_steps_lower_the_loss(ref256, tmp_path):
    recipe = recipe_from_dict(_packing_recipe(ref256, tmp_path / "run", max_length=512))
    parts = build_run(recipe)
    batch = parts.collate_fn([parts.train_data[i] for i in range(4)])
    assert batch["segment_ids"].max() > 1 and batch["input_ids"].shape[0] < 4  # really packed
    assert batch["input_ids"].shape[1] <= 512
    result = run_recipe(recipe)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.step == 2 and len(losses) == 2
    assert losses[1] < losses[0], losses
