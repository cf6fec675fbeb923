"""Generation: ours vs transformers 5.23 ``generate`` on a tiny random SmolVLM-256M-shaped checkpoint.

The checkpoint keeps the real 256M tokenizer, chat template and generation config (vocab 49280,
``<image>`` = 49190, eos 49279) but has a tiny vision tower (64 px tiles, 8 px patches, pixel
shuffle 2 -> S = 16 tokens per tile) and a 2-layer text model; the processor files are edited to
match (tile side M = 64, longest edge L = 128, image_seq_len 16). transformers' own processor
builds the inputs for both sides, so these tests check generation alone.

Greedy token ids must match exactly. Both sides run fp32 SDPA attention; logits agree to ~1e-6
(see test_model_parity.py), and the larger init scale below (std 0.2) spreads the logits so far
apart that such rounding cannot flip an argmax.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import smolvlm
import transformers
from smolvlm import SmolVLM, SmolVLMProcessor
from smolvlm.generation.feature_cache import FeatureCache
from smolvlm.generation.generate import generate_ids, generate_tokens
from smolvlm.generation.stream import StreamStats, stream
from smolvlm.generation.text_stream import apply_stop_strings
from tests.helpers import MAX_POS, build_tiny_checkpoint, make_image

EOU = 49279  # <end_of_utterance>
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ref256) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny256"), ref256)


@pytest.fixture(scope="module")
def hf(ckpt):
    return transformers.Idefics3ForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def ours(ckpt):
    return SmolVLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def proc(ckpt):
    p = transformers.AutoProcessor.from_pretrained(ckpt)
    p.tokenizer.padding_side = "left"
    return p


def chat(text: str, n_images: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def inputs(proc, prompts: list[tuple[str, list[Image.Image]]]) -> dict[str, torch.Tensor]:
    texts = [proc.apply_chat_template(chat(t, len(ims)), add_generation_prompt=True) for t, ims in prompts]
    images = [ims for _, ims in prompts]
    kw = dict(images=images) if any(images) else {}
    return dict(proc(text=texts, return_tensors="pt", padding=True, **kw))


def hf_generate(hf, batch, **kw) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(**batch, eos_token_id=kw.pop("eos_token_id", EOU), pad_token_id=2, **kw)


IMG_A, IMG_B = make_image(100, 80, 1), make_image(50, 120, 2)
CASES = {
    "text": [("Tell me a story about a cat.", [])],
    "one_image": [("Describe this image.", [IMG_A])],
    "two_images": [("Compare these images.", [IMG_A, IMG_B])],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_transformers(hf, ours, proc, case):
    batch = inputs(proc, CASES[case])
    ref = hf_generate(hf, batch, max_new_tokens=12, do_sample=False)
    mine = generate_ids(ours, **batch, max_new_tokens=12)
    assert torch.equal(mine, ref)


def test_batched_left_padding_matches_transformers_and_single(hf, ours, proc):
    prompts = [CASES["one_image"][0], ("Hi", []), CASES["two_images"][0]]
    batch = inputs(proc, prompts)
    assert (batch["attention_mask"] == 0).any()  # really padded on the left
    ref = hf_generate(hf, batch, max_new_tokens=10)
    mine = generate_ids(ours, **batch, max_new_tokens=10)
    assert torch.equal(mine, ref)
    T = batch["input_ids"].shape[1]
    for i, p in enumerate(prompts):
        alone = generate_ids(ours, **inputs(proc, [p]), max_new_tokens=10)
        assert alone[0, -10:].tolist() == mine[i, T:].tolist()


def test_eos_stops_rows_and_pads_like_transformers(hf, ours, proc):
    batch = inputs(proc, [("Tell me a story about a cat.", []), ("Hi", [])])
    free = generate_ids(ours, **batch, max_new_tokens=8)
    T = batch["input_ids"].shape[1]
    eos = int(free[0, T + 2])  # a token row 0 emits at step 3: row 0 stops there, row 1 maybe later
    ref = hf_generate(hf, batch, max_new_tokens=8, eos_token_id=eos)
    mine = generate_ids(ours, **batch, max_new_tokens=8, eos_token_id=eos, pad_token_id=2)
    assert torch.equal(mine, ref)
    assert mine[0, T + 3:].eq(2).all()  # finished row padded with pad id 2


def test_default_length_and_stop_ids(hf, ours, proc):
    batch = inputs(proc, CASES["text"])
    mine = generate_ids(ours, **batch)  # reads generation_config.json: eos 49279; 20 new tokens
    assert ours.generation_config["eos_token_id"] == EOU
    ref = hf_generate(hf, batch)  # transformers' default: max_length 20 -> 20 new tokens here
    assert mine.shape[1] - batch["input_ids"].shape[1] == 20
    assert torch.equal(mine, ref)


def test_kv_cache_matches_full_recompute(ours, proc):
    batch = inputs(proc, [CASES["one_image"][0], ("Hi", [])])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(8):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = ours(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=batch["pixel_values"],
                          pixel_attention_mask=batch["pixel_attention_mask"]).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    cached = generate_ids(ours, **batch, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(cached, ids)


def test_feature_cache_reuses_encoder_and_keeps_output(ours, proc):
    batch = inputs(proc, CASES["two_images"])
    calls = {"n": 0}
    orig = ours.get_image_features

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    ours.get_image_features = counting
    try:
        plain = generate_ids(ours, **batch, max_new_tokens=6)
        assert calls["n"] == 1
        cache = FeatureCache()
        first = generate_ids(ours, **batch, max_new_tokens=6, feature_cache=cache)
        second = generate_ids(ours, **batch, max_new_tokens=6, feature_cache=cache)
        assert calls["n"] == 2  # the second request encoded nothing
        assert (cache.hits, cache.encoder_calls) == (cache.misses, 1)
        # a new question about one of the same images: all of its tiles are hits
        generate_ids(ours, **inputs(proc, [("What is it?", [IMG_B])]), max_new_tokens=2, feature_cache=cache)
        assert calls["n"] == 2
    finally:
        del ours.get_image_features
    assert torch.equal(first, plain) and torch.equal(second, plain)


def test_feature_cache_evicts_by_bytes(ours, proc):
    batch = inputs(proc, CASES["one_image"])
    tiles = int(batch["pixel_values"].shape[1])
    one_tile = 16 * ours.config.text_config.hidden_size * 4  # (S, D) fp32
    cache = FeatureCache(max_bytes=2 * one_tile)
    generate_ids(ours, **batch, max_new_tokens=1, feature_cache=cache)
    assert len(cache) == 2 and cache.nbytes <= 2 * one_tile and tiles > 2


def test_sampling_reproducible_and_matches_transformers_seeded(hf, ours, proc):
    batch = inputs(proc, CASES["one_image"])
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2)
    a = generate_ids(ours, **batch, seed=123, **kw)
    b = generate_ids(ours, **batch, seed=123, **kw)
    c = generate_ids(ours, **batch, seed=124, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(123)  # transformers samples with torch.multinomial on the global RNG
    ref = hf_generate(hf, batch, **kw)
    assert torch.equal(a, ref)


def test_repetition_penalty_and_min_p_match_transformers(hf, ours, proc):
    batch = inputs(proc, CASES["text"])
    assert torch.equal(generate_ids(ours, **batch, max_new_tokens=10, repetition_penalty=1.5),
                       hf_generate(hf, batch, max_new_tokens=10, repetition_penalty=1.5))
    kw = dict(max_new_tokens=8, do_sample=True, min_p=0.2, top_k=0)
    torch.manual_seed(5)
    ref = hf_generate(hf, batch, **kw)
    assert torch.equal(generate_ids(ours, **batch, seed=5, **kw), ref)


def test_stop_strings_match_transformers(hf, ours, proc):
    batch = inputs(proc, CASES["text"])
    T = batch["input_ids"].shape[1]
    free = generate_ids(ours, **batch, max_new_tokens=12)
    text = proc.tokenizer.decode(free[0, T:], skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 2]  # two characters from the middle of the answer
    assert stop.strip()
    mine = generate_ids(ours, **batch, max_new_tokens=12, stop_strings=[stop], tokenizer=proc.tokenizer)
    with torch.no_grad():
        ref = hf.generate(**batch, max_new_tokens=12, eos_token_id=EOU, pad_token_id=2, stop_strings=[stop],
                          tokenizer=proc.tokenizer)
    assert torch.equal(mine, ref)
    assert mine.shape[1] < free.shape[1]


def test_context_overflow_raises_before_work(ours, proc, monkeypatch):
    batch = inputs(proc, CASES["one_image"])
    T = batch["input_ids"].shape[1]
    work = []
    monkeypatch.setattr(ours, "new_kv_cache", lambda *a, **k: work.append("cache"))
    monkeypatch.setattr(ours, "get_image_features", lambda *a, **k: work.append("vision"))
    monkeypatch.setattr(ours, "forward", lambda *a, **k: work.append("forward"))
    with pytest.raises(ValueError, match=rf"{T} tokens.*max_new_tokens={MAX_POS - T + 1}.*={MAX_POS}"):
        generate_ids(ours, **batch, max_new_tokens=MAX_POS - T + 1, feature_cache=FeatureCache())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_tokens(ours, **batch, max_new_tokens=MAX_POS)  # raised on the call, not on first next()
    assert work == []
    monkeypatch.undo()
    assert generate_ids(ours, **batch, max_new_tokens=MAX_POS - T, eos_token_id=[]).shape[1] == MAX_POS  # fits


def test_stream_text_equals_generate_decode(ours, proc, ckpt):
    """``smolvlm.stream`` with our processor: same prompt as transformers' processor, same text as decode."""
    ours_proc = SmolVLMProcessor.from_pretrained(ckpt)
    msgs = [{"role": "user", "content": [{"type": "image", "image": IMG_A},
                                         {"type": "text", "text": "Describe this image."}]}]
    batch = inputs(proc, CASES["one_image"])
    ids = generate_ids(ours, **batch, max_new_tokens=15)
    T = batch["input_ids"].shape[1]
    full = proc.tokenizer.decode(ids[0, T:], skip_special_tokens=True)
    stats = StreamStats()
    pieces = list(stream(ours, ours_proc, msgs, stats=stats, max_new_tokens=15))
    assert "".join(pieces) == full == stats.text and len(pieces) > 1
    assert stats.prompt_tokens == T and stats.new_tokens == ids.shape[1] - T
    # the string form: images first, then the text, one user turn
    assert "".join(stream(ours, ours_proc, "Describe this image.", images=[IMG_A], max_new_tokens=15)) == full
    assert smolvlm.answer(ours, ours_proc, msgs, max_new_tokens=15) == full  # the non-streaming form
    stop = full[3:5]
    cut = "".join(stream(ours, ours_proc, msgs, max_new_tokens=15, stop_strings=[stop]))
    assert cut == apply_stop_strings(full, [stop]) and len(cut) < len(full)


def test_unknown_generation_option_is_named(ours, proc):
    batch = inputs(proc, [("Hi", [])])
    with pytest.raises(TypeError, match="max_tokens"):
        ours.generate(**batch, max_tokens=5)
