"""Ours vs transformers 5.23 on tiny random models of both families (idefics3 and smolvlm).

transformers builds and saves a random model (float32, eager attention); our production loader
reads the checkpoint; logits must match. The reverse direction (we save, transformers loads) is
checked too. Tolerances:
* fp32: rtol = atol = 1e-5. The only numerical difference is SDPA (ours) vs eager matmul+softmax
  (theirs): summation order, ~1e-7 relative per op on logits of magnitude ~1.
* bf16: atol = rtol = 1e-2. One bf16 ulp at |logit| ~0.6 is 3.9e-3; SDPA keeps the softmax
  product in fp32 where eager rounds the probabilities to bf16 first, so an ulp or two of drift
  through 2+2 layers is expected. Measured max |diff|: 3.9e-3 (one ulp) for both families.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import transformers
from smolvlm import SmolVLM
from smolvlm.model.vision import patch_position_ids

VOCAB, IMG = 300, 299  # image_token_id inside the vocabulary
S = 4  # tokens per image: (32 // 8)^2 / 2^2
FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=1e-2, atol=1e-2)


def hf_config(model_type: str, tie: bool = False):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, pad_token_id=2,
                tie_word_embeddings=tie)
    cls = transformers.Idefics3Config if model_type == "idefics3" else transformers.SmolVLMConfig
    return cls(vision_config=vision, text_config=text, image_token_id=IMG, scale_factor=2, tie_word_embeddings=tie)


def hf_model(model_type: str, dtype=torch.float32, tie: bool = False):
    cls = (transformers.Idefics3ForConditionalGeneration if model_type == "idefics3"
           else transformers.SmolVLMForConditionalGeneration)
    torch.manual_seed(1)
    m = cls._from_config(hf_config(model_type, tie), dtype=dtype, attn_implementation="eager")
    # Norm weights default to 1 / biases to 0: randomise them so a wrong cast order or a swapped
    # norm cannot hide.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save, checkpoint dir) per model type."""
    ref = hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(d)
    return ref, SmolVLM.from_pretrained(d), d


def image_prompt(n_images: int, length: int = 20, seed: int = 0) -> torch.Tensor:
    """Token ids (length,) with ``n_images`` blocks of S image tokens, each between two other tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 2, (length,), generator=g)
    for k in range(n_images):
        start = 2 + k * (S + 2)
        ids[start:start + S] = IMG
    return ids


def pixels(b: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def both(ref, ours, **kw):
    with torch.no_grad():
        theirs = ref(**kw)
        mine = ours(**kw)
    return mine, theirs


def test_text_only(pair):
    ref, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 12))
    mine, theirs = both(ref, ours, input_ids=ids)
    assert_close(mine.logits, theirs.logits, **FP32)


def test_one_image(pair):
    ref, ours, _ = pair
    ids = image_prompt(1)[None]
    mine, theirs = both(ref, ours, input_ids=ids, pixel_values=pixels(1, 1))
    assert_close(mine.logits, theirs.logits, **FP32)


def test_several_images_per_sample(pair):
    ref, ours, _ = pair
    ids = torch.stack([image_prompt(3, 24, seed=1), image_prompt(3, 24, seed=2)])
    mine, theirs = both(ref, ours, input_ids=ids, pixel_values=pixels(2, 3))
    assert_close(mine.logits, theirs.logits, **FP32)


def test_batch_with_different_image_counts(pair):
    """Sample 0 has 1 image, sample 1 has 3: sample 0's two extra slots are all-zero padding images."""
    ref, ours, _ = pair
    ids = torch.stack([image_prompt(1, 24, seed=3), image_prompt(3, 24, seed=4)])
    pv = pixels(2, 3, seed=5)
    pv[0, 1:] = 0.0
    mine, theirs = both(ref, ours, input_ids=ids, pixel_values=pv)
    assert_close(mine.logits, theirs.logits, **FP32)
    # The merge order matters: swapping the two real images of sample 1 must change its logits.
    pv2 = pv.clone()
    pv2[1, [0, 1]] = pv[1, [1, 0]]
    with torch.no_grad():
        assert not torch.allclose(ours(input_ids=ids, pixel_values=pv2).logits[1], mine.logits[1])


@pytest.mark.parametrize("rows,cols", [(24, 16), (8, 32), (17, 9)])
def test_partial_patch_grid(pair, rows, cols):
    """Valid pixels form a top-left rows x cols rectangle; bucketed position ids + key masking."""
    ref, ours, _ = pair
    ids = torch.stack([image_prompt(2, 20, seed=6), image_prompt(2, 20, seed=7)])
    pv = pixels(2, 2, seed=8)
    mask = torch.ones(2, 2, 32, 32, dtype=torch.long)
    mask[0, 1] = 0
    mask[0, 1, :rows, :cols] = 1
    pv[0, 1] *= mask[0, 1]  # the processor zero-pads outside the image
    mine, theirs = both(ref, ours, input_ids=ids, pixel_values=pv, pixel_attention_mask=mask)
    assert_close(mine.logits, theirs.logits, **FP32)


def test_left_padded_batch(pair):
    ref, ours, _ = pair
    ids = torch.stack([image_prompt(1, 20, seed=9), image_prompt(1, 20, seed=10)])
    ids[0, :5] = 2  # left padding (pad id), before sample 0's image block moved right
    ids[0, 5:] = image_prompt(1, 15, seed=11)
    am = torch.ones_like(ids)
    am[0, :5] = 0
    mine, theirs = both(ref, ours, input_ids=ids, attention_mask=am, pixel_values=pixels(2, 1, seed=12))
    real = am.bool()
    assert torch.isfinite(mine.logits).all()  # padded queries must not produce NaN
    assert_close(mine.logits[real], theirs.logits[real], **FP32)


def test_loss_matches(pair):
    ref, ours, _ = pair
    ids = torch.stack([image_prompt(1, 16, seed=13), image_prompt(1, 16, seed=14)])
    labels = ids.clone()
    labels[labels == IMG] = -100
    labels[0, :4] = -100
    mine, theirs = both(ref, ours, input_ids=ids, pixel_values=pixels(2, 1), labels=labels)
    assert_close(mine.loss, theirs.loss, **FP32)
    assert mine.loss.dtype == torch.float32


def test_logits_to_keep(pair):
    ref, ours, _ = pair
    ids = image_prompt(1)[None]
    mine, theirs = both(ref, ours, input_ids=ids, pixel_values=pixels(1, 1), logits_to_keep=3)
    assert mine.logits.shape == (1, 3, VOCAB)
    assert_close(mine.logits, theirs.logits, **FP32)


def test_inputs_embeds_path(pair):
    """With embeddings only, image slots are found by comparing against the <image> embedding (as the reference)."""
    ref, ours, _ = pair
    ids = image_prompt(1)[None]
    emb = ours.model.text_model.embed_tokens(ids).detach()
    mine, theirs = both(ref, ours, inputs_embeds=emb, pixel_values=pixels(1, 1))
    assert_close(mine.logits, theirs.logits, **FP32)


def test_image_token_count_mismatch_is_clear(pair):
    _, ours, _ = pair
    ids = image_prompt(1)[None]
    with pytest.raises(ValueError, match=rf"{S} <image> tokens.*{2 * S} feature rows"):
        ours(input_ids=ids, pixel_values=pixels(1, 2))


def test_all_padding_images(pair):
    """No real image: the first (all-zero) image is kept (SmolVLM rule), so a prompt without <image>
    tokens is rejected with a clear error. The reference raises too: SmolVLM on the count check,
    Idefics3 5.23 (which keeps none) deep inside its vision embeddings on an empty batch."""
    ref, ours, _ = pair
    ids = torch.randint(0, VOCAB - 2, (1, 10))
    pv = torch.zeros(1, 2, 3, 32, 32)
    with pytest.raises(Exception):
        ref(input_ids=ids, pixel_values=pv)
    with pytest.raises(ValueError, match=f"0 <image> tokens.*{S} feature rows"):
        ours(input_ids=ids, pixel_values=pv)
    # With a matching prompt the kept padding image is encoded like the reference does (SmolVLM only).
    if ours.config.model_type == "smolvlm":
        mine, theirs = both(ref, ours, input_ids=image_prompt(1)[None], pixel_values=pv)
        assert_close(mine.logits, theirs.logits, **FP32)


@pytest.mark.parametrize("model_type", ["idefics3", "smolvlm"])
def test_bf16(model_type, tmp_path):
    ref = hf_model(model_type, dtype=torch.bfloat16)
    ref.save_pretrained(tmp_path)
    ours = SmolVLM.from_pretrained(tmp_path, dtype="auto")  # config dtype: bfloat16
    assert ours.dtype == torch.bfloat16
    ids = torch.stack([image_prompt(1, 20, seed=15), image_prompt(2, 20, seed=16)])
    pv = pixels(2, 2, seed=17)
    pv[0, 1] = 0.0
    mine, theirs = both(ref, ours, input_ids=ids, pixel_values=pv)
    assert mine.logits.dtype == torch.bfloat16
    assert_close(mine.logits.float(), theirs.logits.float(), **BF16)


@pytest.mark.parametrize("model_type,tie", [("idefics3", False), ("smolvlm", True)])
def test_ours_saved_transformers_loads(model_type, tie, tmp_path):
    """Reverse direction: a checkpoint we write is loaded by AutoModelForImageTextToText unchanged."""
    src = tmp_path / "src"
    hf_model(model_type, tie=tie).save_pretrained(src)
    ours = SmolVLM.from_pretrained(src)
    assert (ours.lm_head.weight is ours.model.text_model.embed_tokens.weight) == tie
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    back = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert type(back).__name__ == ("Idefics3" if model_type == "idefics3" else "SmolVLM") + "ForConditionalGeneration"
    ids = image_prompt(2, 20, seed=18)[None]
    mine, theirs = both(back.eval(), ours, input_ids=ids, pixel_values=pixels(1, 2, seed=19))
    assert_close(mine.logits, theirs.logits, **FP32)


@pytest.mark.parametrize("n", [4, 19, 25, 27, 32])
def test_vision_position_ids_match_reference(n):
    """Every partial grid (nb_h, nb_w) for table sizes where float bucketing and integer floor differ (19, 25)."""
    cfg = transformers.Idefics3VisionConfig(hidden_size=4, image_size=n, patch_size=1)
    emb = transformers.models.idefics3.modeling_idefics3.Idefics3VisionEmbeddings(cfg)
    with torch.no_grad():
        emb.position_embedding.weight.copy_(torch.arange(n * n, dtype=torch.float32)[:, None].expand(-1, 4))
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
    masks = torch.zeros(n * n, n, n, dtype=torch.bool)
    for i, (h, w) in enumerate((h, w) for h in range(1, n + 1) for w in range(1, n + 1)):
        masks[i, :h, :w] = True
    with torch.no_grad():
        ref_ids = emb(torch.zeros(n * n, 3, n, n), masks)[..., 0].long()
    assert torch.equal(patch_position_ids(masks, n), ref_ids)
