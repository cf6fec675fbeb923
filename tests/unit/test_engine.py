"""generation/engine.py: continuous batching against one-at-a-time ``generate_ids``, plus the per-row KV path.

Exactness. Every engine request must give exactly the token ids ``generate_ids`` gives for it
alone (fp32). The two differ only in how attention is summed: the engine decodes rows at
different positions in one batch with an explicit per-row mask over ``max(pos) + 1`` slots,
``generate_ids`` uses no mask over ``pos + 1`` slots (and the engine's prefill is the same call on
a row view of the shared cache). Masked keys contribute exact zeros, so only the summation order
changes: logits agree to ~1e-6 (checked below on the model path, rtol = atol = 1e-5 as in
test_model_unit.py). The tiny checkpoint's init std 0.2 spreads logits far apart (top-2 gaps
are orders of magnitude above 1e-6), so such rounding cannot flip an argmax; the same holds for
the multinomial draws of a seeded request, whose uniform draws would have to land within ~1e-7
of a bucket edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue

import pytest
import torch
from torch.testing import assert_close

from smolvlm import SmolVLM, SmolVLMProcessor, kernels
from smolvlm.generation.config import resolve_settings
from smolvlm.generation.engine import MIN_PREFILL_CHUNK, PREFILL_CHUNK, SLICE_PER_DECODE, SLICE_S, Engine
from smolvlm.generation.feature_cache import FeatureCache, TileEncoding
from smolvlm.generation.generate import generate_ids
from smolvlm.model import vlm as vlm_mod
from smolvlm.generation.requests import EngineBusy, EngineClosed, FinishEvent, Request, RequestTooLong, TokenEvent
from smolvlm.model.kv_cache import KVCache
from tests.helpers import build_tiny_checkpoint, make_image, tiny_config

TOL = dict(rtol=1e-5, atol=1e-5)
IMG_A, IMG_B = make_image(100, 80, 1), make_image(50, 120, 2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ref256):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny256"), ref256)


@pytest.fixture(scope="module")
def model(ckpt) -> SmolVLM:
    return SmolVLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def proc(ckpt) -> SmolVLMProcessor:
    return SmolVLMProcessor.from_pretrained(ckpt)


def inputs(proc, text: str, images=()) -> dict[str, torch.Tensor]:
    out = proc.chat_inputs(text, list(images))
    return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask") if k in out}


def alone(model, inp, **kw) -> list[int]:
    """The reference: this request by itself through generate_ids."""
    return generate_ids(model, **inp, **kw)[0, inp["input_ids"].shape[1]:].tolist()


def request(model, inp, text=None, **kw) -> Request:
    n = inp["input_ids"].shape[1]
    return Request.from_inputs(inp, settings=resolve_settings(model, n, **kw), text=text)


def drain(engine: Engine, limit: int = 1000) -> None:
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("engine did not go idle")


def tokens(handle) -> list[int]:
    return [ev.token_id for ev in handle if isinstance(ev, TokenEvent)]


# -- the per-row KV path (model/kv_cache.py, model/text.py) ----------------------------------------
@torch.no_grad()
def test_per_row_decode_equals_full_recompute():
    """Rows prefilled separately through row views, then one decode at different slots per row."""
    torch.manual_seed(0)
    m = SmolVLM.from_config(tiny_config("smolvlm")).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 290, (1, 7), generator=g), torch.randint(3, 290, (1, 4), generator=g)
    cache = m.new_kv_cache(3, 16)
    for t in (*cache.k, *cache.v):
        t.fill_(1e3)  # stale keys of an earlier request: must never be attended to
    ta = m(input_ids=a, kv_cache=cache.rows(0, 1), input_pos=torch.arange(7)).logits[:, -1].argmax(-1)
    tb = m(input_ids=b, kv_cache=cache.rows(2, 3), input_pos=torch.arange(4)).logits[:, -1].argmax(-1)
    toks = torch.tensor([[int(ta)], [0], [int(tb)]])  # row 1 is free: a dummy token at slot 0
    out = m(input_ids=toks, kv_cache=cache, input_pos=torch.tensor([[7], [0], [4]])).logits[:, -1]
    assert torch.isfinite(out).all()
    assert_close(out[0], m(input_ids=torch.cat([a, ta[:, None]], 1)).logits[0, -1], **TOL)
    assert_close(out[2], m(input_ids=torch.cat([b, tb[:, None]], 1)).logits[0, -1], **TOL)


def test_kv_cache_row_views_and_per_row_update():
    c = KVCache(n_layers=1, batch_size=3, n_kv_heads=2, max_len=5, head_dim=4)
    view = c.rows(1, 3)
    assert view.batch_size == 2 and view.k[0].data_ptr() == c.k[0][1].data_ptr() and view.k[0].is_contiguous()
    assert c.rows(0, 3) is c
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    view.update(0, torch.tensor([[3], [0]]), k, v)
    assert torch.equal(c.k[0][1, :, 3], k[0, :, 0]) and torch.equal(c.v[0][2, :, 0], v[1, :, 0])
    assert int((c.k[0] != 0).sum()) == k.numel()  # nothing else written
    with pytest.raises(ValueError, match="outside this cache's 3 rows"):
        c.rows(2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        view.update(0, torch.tensor([[1], [2], [3]]), k, v)
    with pytest.raises(ValueError, match="KV cache overflow"):
        view.update(0, torch.tensor([[5], [0]]), k, v)


# -- (1) exactness with requests joining mid-decode ----------------------------------------------
def test_concurrent_greedy_equals_one_at_a_time(model, proc):
    cases = [("Tell me a long story about a cat and a dog.", (), 12),
             ("Describe this image.", (IMG_A,), 9),
             ("What is in the picture?", (IMG_A,), 11),  # the same image as above
             ("Hi", (), 7),
             ("Compare these images.", (IMG_A, IMG_B), 8)]
    inps = [inputs(proc, t, ims) for t, ims, _ in cases]
    refs = [alone(model, inp, max_new_tokens=n, eos_token_id=[]) for inp, (_, _, n) in zip(inps, cases)]
    engine = Engine(model, max_batch=4, max_context=256)
    handles = [engine.submit(request(model, inps[0], max_new_tokens=cases[0][2], eos_token_id=[]))]
    schedule = {2: [1, 2], 4: [3], 5: [4]}  # step -> requests that arrive then (4 waits for a free row)
    for step in range(1, 40):
        for i in schedule.get(step, []):
            handles.append(engine.submit(request(model, inps[i], max_new_tokens=cases[i][2], eos_token_id=[])))
        engine.step()
    assert [tokens(h) for h in handles] == refs
    assert {h.finish.reason for h in handles} == {"length"}
    m = engine.metrics()
    assert m["decode_steps"] < sum(len(r) for r in refs) - len(refs)  # rows really shared decode steps
    # every tile encoded once: requests 2 and 4 reuse IMG_A's tiles (IMG_A alone is 1 image; 4 adds IMG_B's)
    a_tiles, ab_tiles = inps[1]["pixel_values"].shape[1], inps[4]["pixel_values"].shape[1]
    assert m["feature_cache_misses"] == ab_tiles and m["feature_cache_hits"] >= a_tiles


def test_burst_shares_one_prefill_forward_and_equals_one_at_a_time(model, proc):
    """Requests arriving together in adjacent rows are prefilled by one right-padded forward (text and
    image prompts alike); each one's tokens equal its tokens alone."""
    cases = [("Tell me about cats.", ()), ("Tell me about dogs!", ()), ("And birds, please.", ()),
             ("Describe this image.", (IMG_A,)), ("What is in the picture?", (IMG_A,))]
    inps = [inputs(proc, t, ims) for t, ims in cases]
    refs = [alone(model, inp, max_new_tokens=6, eos_token_id=[]) for inp in inps]
    engine = Engine(model, max_batch=8, max_context=256)
    handles = [engine.submit(request(model, inp, max_new_tokens=6, eos_token_id=[])) for inp in inps]
    drain(engine)
    assert [tokens(h) for h in handles] == refs
    m = engine.metrics()
    assert m["prefills"] == 5 and m["prefill_forwards"] == 2  # 3 text prompts together, the 2 image prompts together


def test_each_prefill_hands_its_temporaries_back(model, proc, monkeypatch):
    """After each prefill (generate_ids and the engine alike) the heap's freed blocks go back to the
    OS (``smolvlm.memory.release_freed_memory``): once per prefill, before the first token, and
    ``generate_ids`` once more between an image's encoding and the prompt's forward, and once when
    its generation ends (its cache is a tensor per layer, small enough for glibc's heap); never per
    decoded token (a 512x512 prompt's temporaries otherwise stay through the decode and the next
    request: 500M bf16, 1493 against 1355 MiB after two images)."""
    import smolvlm.generation.engine as engine_mod
    import smolvlm.generation.generate as generate_mod

    events: list[str] = []
    for mod in (generate_mod, engine_mod):
        monkeypatch.setattr(mod, "release_freed_memory", lambda: events.append("release"))
    inp = inputs(proc, "Describe this image.", (IMG_A,))
    stream = generate_mod.generate_tokens(model, inp["input_ids"], inp["attention_mask"], inp["pixel_values"],
                                          inp["pixel_attention_mask"], max_new_tokens=5, eos_token_id=[])
    for _ in stream:
        events.append("token")
    # after the image's encoding, after the prefill, after the last token
    assert events == ["release", "release"] + ["token"] * 5 + ["release"]
    events.clear()
    engine = Engine(model, max_batch=2, max_context=256)
    handles = [engine.submit(request(model, inputs(proc, t), max_new_tokens=4, eos_token_id=[]))
               for t in ("Tell me about cats.", "Tell me about dogs!")]
    drain(engine)
    assert all(len(tokens(h)) == 4 for h in handles)
    assert events == ["release"] * engine.metrics()["prefill_forwards"]


def test_prefill_groups_adjacent_rows_similar_lengths_bounded_tokens():
    def prep(t, prefilled=0):
        return type("P", (), {"input_ids": torch.zeros(1, t, dtype=torch.long), "prefilled": prefilled})()

    def shape(admitted, **kw):
        return [[(r, p.input_ids.shape[1]) for r, p in g] for g in Engine._prefill_groups(admitted, **kw)]

    assert shape([(0, prep(10)), (1, prep(12)), (3, prep(11))]) == [[(0, 10), (1, 12)], [(3, 11)]]  # row 2 busy
    assert shape([(0, prep(10)), (1, prep(40))]) == [[(0, 10)], [(1, 40)]]  # 30 of 80 slots would be padding
    assert shape([(0, prep(30)), (1, prep(40))]) == [[(0, 30), (1, 40)]]  # 10 of 80: fine
    assert shape([(r, prep(100)) for r in range(5)], max_tokens=300) == [[(0, 100), (1, 100), (2, 100)],
                                                                          [(3, 100), (4, 100)]]
    # the last chunk of a prompt written a chunk per step (its slots from ``prefilled`` on) goes alone
    assert shape([(0, prep(30)), (1, prep(40, prefilled=8)), (2, prep(35))]) == [[(0, 30)], [(1, 40)], [(2, 35)]]


@torch.no_grad()
def test_logits_at_picks_one_position_per_row():
    torch.manual_seed(0)
    m = SmolVLM.from_config(tiny_config("smolvlm")).eval()
    ids = torch.randint(3, 290, (3, 9), generator=torch.Generator().manual_seed(1))
    full = m(input_ids=ids).logits
    at = torch.tensor([8, 2, 5])
    # The same fp32 hidden states through lm_head as a 3-row instead of a 27-row GEMM: bit-identical
    # where the kernel blocks both alike (AMX Xeon), a few ulps apart where it does not (AVX2 EPYC:
    # another summation order over 64 channels), so assert_close's fp32 default (rtol 1.3e-6, atol 1e-5).
    # A wrong position would differ by the logits' own spread (~0.1), far outside it.
    assert_close(m(input_ids=ids, logits_at=at).logits, full[torch.arange(3), at][:, None])


def test_eos_stops_and_default_settings(model, proc):
    inp = inputs(proc, "Tell me a long story about a cat and a dog.")
    free = alone(model, inp, max_new_tokens=8, eos_token_id=[])
    eos = free[3]
    ref = alone(model, inp, max_new_tokens=8, eos_token_id=eos)
    engine = Engine(model, max_batch=2, max_context=256)
    h = engine.submit(request(model, inp, max_new_tokens=8, eos_token_id=eos))
    d = engine.submit(Request.from_inputs(inp))  # settings from generation_config.json: 20 tokens, eos 49279
    k = engine.submit_inputs(inp, max_new_tokens=5, eos_token_id=[])
    drain(engine)
    done = h.result()
    assert done.token_ids == ref == free[:ref.index(eos) + 1]
    assert done.finish.reason == "stop" and done.finish.completion_tokens == len(ref)
    assert done.finish.prompt_tokens == inp["input_ids"].shape[1] and done.finish.time_to_first_token_s > 0
    assert d.result().token_ids == alone(model, inp)
    assert k.result().token_ids == free[:5]


# -- (2) cancellation frees the row ---------------------------------------------------------------
def test_cancel_frees_row_for_waiting_request(model, proc):
    a, b = inputs(proc, "Tell me a long story."), inputs(proc, "Describe this image.", (IMG_B,))
    engine = Engine(model, max_batch=1, max_context=256)
    ha = engine.submit(request(model, a, max_new_tokens=100, eos_token_id=[]))
    hb = engine.submit(request(model, b, max_new_tokens=6, eos_token_id=[]))
    for _ in range(3):
        engine.step()
    assert engine.metrics()["waiting"] == 1 and not hb.done
    ha.cancel()
    drain(engine)
    assert ha.finish.reason == "cancelled" and ha.finish.completion_tokens == 4  # prefill + 3 decodes
    assert tokens(hb) == alone(model, b, max_new_tokens=6, eos_token_id=[])
    assert engine.metrics()["active_rows"] == 0


def test_closing_the_iterator_or_async_consumer_cancels(model, proc):
    inp = inputs(proc, "Tell me a long story.")
    with Engine(model, max_batch=2, max_context=256) as engine:  # the loop thread
        h = engine.submit(request(model, inp, max_new_tokens=200, eos_token_id=[]))
        for ev in h:
            if ev.index == 1:
                break  # the client went away
        assert h.wait(10) and h.finish.reason == "cancelled" and h.finish.completion_tokens < 200

        async def first_two() -> list[int]:
            h = engine.submit(request(model, inp, max_new_tokens=200, eos_token_id=[]))
            got = []
            async with contextlib.aclosing(h.__aiter__()) as events:
                async for ev in events:
                    got.append(ev.token_id)
                    if len(got) == 2:
                        break
            assert h.cancelled  # closing the async iterator cancelled the request
            return got

        assert asyncio.run(first_two()) == alone(model, inp, max_new_tokens=2, eos_token_id=[])

        async def whole() -> list:
            return [ev async for ev in engine.submit(request(model, inp, max_new_tokens=5, eos_token_id=[]))]

        evs = asyncio.run(whole())
        assert [e.token_id for e in evs[:-1]] == alone(model, inp, max_new_tokens=5, eos_token_id=[])
        assert isinstance(evs[-1], FinishEvent) and evs[-1].reason == "length"
    assert engine.metrics()["cancelled"] == 2 and engine.metrics()["active_rows"] == 0


# -- (3) limits ----------------------------------------------------------------------------------
def test_too_long_rejected_and_full_queue_busy(model, proc):
    inp = inputs(proc, "Hi")
    t = inp["input_ids"].shape[1]
    engine = Engine(model, max_batch=1, max_context=t + 10, max_queue=1)
    with pytest.raises(RequestTooLong, match=rf"prompt of {t} tokens \+ max_new_tokens=11 .* context of {t + 10}"):
        engine.submit(request(model, inp, max_new_tokens=11))
    first = engine.submit(request(model, inp, max_new_tokens=10))  # takes the free row at the next step
    queued = engine.submit(request(model, inp, max_new_tokens=10))  # waits: the queue holds one
    with pytest.raises(EngineBusy, match="max_queue=1"):
        engine.submit(request(model, inp, max_new_tokens=10))
    engine.step()
    with pytest.raises(EngineBusy):  # still one running and one waiting
        engine.submit(request(model, inp, max_new_tokens=10))
    drain(engine)
    assert {first.finish.reason, queued.finish.reason} <= {"length", "stop"}
    assert engine.metrics()["rejected"] == 2
    with pytest.raises(ValueError, match="max_context must be"):
        Engine(model, max_context=10_000)
    with pytest.raises(ValueError, match="one conversation"):
        engine.submit(Request(input_ids=torch.ones(2, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match="text sink"):
        engine.submit(request(model, inp, stop_strings=["x"]))



def test_no_queue_takes_a_request_only_when_a_row_is_free(model, proc):
    """max_queue=0 (the server's "no waiting" setting): a free row takes the request, a busy one refuses."""
    inp = inputs(proc, "Hi")
    engine = Engine(model, max_batch=1, max_context=64, max_queue=0)
    first = engine.submit(request(model, inp, max_new_tokens=5))
    with pytest.raises(EngineBusy, match="max_queue=0"):
        engine.submit(request(model, inp, max_new_tokens=5))
    drain(engine)
    assert first.finish.reason in ("length", "stop")
    assert engine.generate([request(model, inp, max_new_tokens=3)] * 2)[1].finish.completion_tokens <= 3

def test_bad_request_fails_alone(model, proc):
    """A request whose images do not match its <image> tokens ends in "error"; the others run on."""
    good, img = inputs(proc, "Hi"), inputs(proc, "Describe this image.", (IMG_A,))
    bad = dict(good, pixel_values=img["pixel_values"], pixel_attention_mask=img["pixel_attention_mask"])
    engine = Engine(model, max_batch=2, max_context=256)
    hb = engine.submit(request(model, bad, max_new_tokens=4))
    hg = engine.submit(request(model, good, max_new_tokens=4, eos_token_id=[]))
    drain(engine)
    assert hb.finish.reason == "error" and "<image> tokens" in hb.finish.error
    assert tokens(hg) == alone(model, good, max_new_tokens=4, eos_token_id=[])


def test_failed_decode_step_fails_its_rows_and_engine_goes_on(model, proc, monkeypatch):
    inp = inputs(proc, "Hi")
    engine = Engine(model, max_batch=2, max_context=256)
    calls = []

    def flaky(**kw):  # the first batched decode (one token per row) fails
        if kw["input_ids"].shape[1] == 1:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("device lost")
        return model(**kw)

    monkeypatch.setattr(engine, "model", flaky)
    hs = [engine.submit(request(model, inp, max_new_tokens=4, eos_token_id=[])) for _ in range(2)]
    drain(engine)
    assert [(h.finish.reason, h.finish.completion_tokens) for h in hs] == [("error", 1)] * 2
    assert "device lost" in hs[0].finish.error and engine.metrics()["active_rows"] == 0
    h = engine.submit(request(model, inp, max_new_tokens=4, eos_token_id=[]))
    drain(engine)
    assert tokens(h) == alone(model, inp, max_new_tokens=4, eos_token_id=[])


# -- (4) the feature cache skips the vision encoder ------------------------------------------------
def test_second_question_about_an_image_skips_the_encoder(model, proc):
    engine = Engine(model, max_batch=2, max_context=256, feature_cache=FeatureCache())
    calls = []
    orig = model.model.vision_model.layerwise
    model.model.vision_model.layerwise = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        first = inputs(proc, "Describe this image.", (IMG_B,))
        engine.submit(request(model, first, max_new_tokens=3))
        drain(engine)
        n = len(calls)
        second = inputs(proc, "What colour is it?", (IMG_B,))
        h = engine.submit(request(model, second, max_new_tokens=3, eos_token_id=[]))
        drain(engine)
    finally:
        del model.model.vision_model.layerwise
    assert n > 0 and len(calls) == n  # no encoder call for the second request
    m = engine.metrics()  # each tile encoded once (a call a tile: in slices), then taken from the cache
    assert m["vision_encoder_calls"] == m["feature_cache_misses"] == m["feature_cache_hits"] == first["pixel_values"].shape[1]
    assert tokens(h) == alone(model, second, max_new_tokens=3, eos_token_id=[])


# -- (5) many requests, bounded memory ------------------------------------------------------------
def test_32_requests_through_8_rows(model, proc):
    texts = [f"Question {i}: what is {i} plus {i}?" for i in range(32)]
    inps = [inputs(proc, t, (IMG_A,) if i % 4 == 0 else ()) for i, t in enumerate(texts)]
    reqs = [request(model, inp, max_new_tokens=3 + i % 5, eos_token_id=[]) for i, inp in enumerate(inps)]
    with Engine(model, max_batch=8, max_context=128, max_queue=4) as engine:  # queue < requests: generate() paces
        ptr, nbytes = engine.cache.k[0].data_ptr(), engine.metrics()["kv_cache_bytes"]
        done = engine.generate(reqs)
        m = engine.metrics()
    assert [d.finish.reason for d in done] == ["length"] * 32
    assert [len(d.token_ids) for d in done] == [3 + i % 5 for i in range(32)]
    assert engine.cache.k[0].data_ptr() == ptr and m["kv_cache_bytes"] == nbytes
    n_tiles = inps[0]["pixel_values"].shape[1]  # IMG_A's, encoded once (a call a tile, in slices), then cached
    assert m["error"] == 0 and m["length"] == 32 and m["active_rows"] == 0
    assert m["vision_encoder_calls"] == m["feature_cache_misses"] == n_tiles and m["feature_cache_hits"] == 7 * n_tiles
    for i in (0, 5, 31):
        assert done[i].token_ids == alone(model, inps[i], max_new_tokens=3 + i % 5, eos_token_id=[])


def test_a_row_taken_from_the_queue_never_looks_free(model, proc):
    """From the step that takes a request off the queue until its row holds it (images encoded, prompt in), the
    row must not count as free. If it did, ``generate`` and the server would see room that is not there, and
    the next ``submit`` would raise ``EngineBusy``: ``test_32_requests_through_8_rows`` failed so, once in a
    while, when the loop thread took a request between its room check and its submit."""
    engine = Engine(model, max_batch=2, max_context=128, max_queue=0)
    seen, advance, prefill = [], engine._advance_pending, engine._prefill

    def watched_advance(admitted):  # the rows just taken off the queue, before they are marked pending
        seen.append(("admitted", {r for r, _ in admitted}, set(engine._free_rows())))
        return advance(admitted)

    def watched_prefill(group):  # the rows out of pending, before they hold their request
        seen.append(("ready", {r for r, _ in group}, set(engine._free_rows())))
        return prefill(group)

    engine._advance_pending, engine._prefill = watched_advance, watched_prefill
    handles = [engine.submit(request(model, inputs(proc, f"Question {i}?", (IMG_A,) if i else ()), max_new_tokens=2,
                                     eos_token_id=[])) for i in range(2)]
    drain(engine)
    assert all(h.done for h in handles) and [h.result().finish.reason for h in handles] == ["length"] * 2
    assert {what for what, rows, _ in seen if rows} == {"admitted", "ready"}
    for what, rows, free in seen:
        assert not rows & free, f"{what} rows {sorted(rows)} counted free"
    assert engine._free_rows() == [0, 1]  # and free again once the requests are done


# -- (6) per-row sampling ------------------------------------------------------------------------
def test_seeded_sampling_same_alone_and_in_batch(model, proc):
    inp = inputs(proc, "Write a poem about the sea.")
    kw = dict(max_new_tokens=10, eos_token_id=[], do_sample=True, temperature=1.3, top_p=0.95, seed=7)
    ref = alone(model, inp, **kw)
    solo = Engine(model, max_batch=1, max_context=256)
    h = solo.submit(request(model, inp, **kw))
    drain(solo)
    engine = Engine(model, max_batch=4, max_context=256)
    others = [engine.submit(request(model, inputs(proc, "Hi"), max_new_tokens=12, eos_token_id=[])),
              engine.submit(request(model, inputs(proc, "Describe this.", (IMG_A,)), max_new_tokens=12,
                                    eos_token_id=[], do_sample=True, seed=1))]
    engine.step()
    engine.step()
    hb = engine.submit(request(model, inp, **kw))  # joins mid-decode, next to a greedy and a sampled row
    drain(engine)
    assert tokens(h) == tokens(hb) == ref
    assert all(o.finish.reason == "length" for o in others)


def test_repetition_penalty_and_stop_sink(model, proc):
    inp = inputs(proc, "Tell me a long story about a cat and a dog.")
    pen = dict(max_new_tokens=8, eos_token_id=[], repetition_penalty=1.5)
    free = alone(model, inp, max_new_tokens=8, eos_token_id=[])

    class StopAt:  # a text sink: piece per token, "stops" on the 4th token (as a stop string would)
        def __init__(self):
            self.n = 0

        def push(self, tid):
            self.n += 1
            return f"<{tid}>", self.n == 4

        def flush(self):
            return "!"

    engine = Engine(model, max_batch=2, max_context=256)
    hp = engine.submit(request(model, inp, **pen))
    hs = engine.submit(request(model, inp, text=StopAt(), max_new_tokens=8, eos_token_id=[]))
    drain(engine)
    assert tokens(hp) == alone(model, inp, **pen)
    done = hs.result()
    assert done.token_ids == free[:4] and done.finish.reason == "stop"
    assert done.text == "".join(f"<{t}>" for t in free[:4])  # no flush after a stop string


def test_get_timeout_and_stop_cancels(model, proc):
    engine = Engine(model, max_batch=1, max_context=64)
    h = engine.submit(request(model, inputs(proc, "Hi"), max_new_tokens=2))
    with pytest.raises(queue.Empty):
        h.get(timeout=0.01)
    with pytest.raises(TimeoutError):
        h.result(timeout=0.01)
    engine.stop()
    assert h.finish.reason == "cancelled"
    with pytest.raises(EngineClosed):
        engine.submit(request(model, inputs(proc, "Hi"), max_new_tokens=2))


@pytest.mark.parametrize("cache", ["fp32", "bf16 as with AMX", "bf16 with smolvlm's kernels"])
def test_bf16_rows_match_alone_with_either_cache(ckpt, proc, monkeypatch, cache):
    """bf16 weights. An fp32 cache (``new_kv_cache`` on CPUs slow at bf16 attention): per-row decode
    attends in fp32 like the one-query path of ``generate_ids``. A bf16 cache: on AMX CPUs both
    attend with PyTorch's bf16 SDPA (smolvlm's kernels off, as there); on AVX-512 BF16 CPUs without
    AMX prompts run smolvlm's bf16 attention and decode its decode attention over the bf16 cache.
    Each way the same greedy tokens (only summation order differs). The first two run on every
    CPU; the third needs AVX-512 BF16."""
    bf16_cache = cache != "fp32"
    monkeypatch.setattr(vlm_mod, "cpu_attends_fast_in", lambda dtype: bf16_cache)
    kernels.prepare()
    if cache == "bf16 as with AMX":
        monkeypatch.setitem(kernels._state, "bf16_attention", "off: AMX CPUs run PyTorch's attention")
        monkeypatch.setitem(kernels._state, "use", "off: AMX CPUs run PyTorch's attention")
    elif cache == "bf16 with smolvlm's kernels" and not kernels.ready("bf16_attention"):
        pytest.skip(f"smolvlm's bf16 attention does not run on this CPU: {kernels._state.get('bf16_attention')}")
    m = SmolVLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    inps = [inputs(proc, "Tell me a long story about a cat and a dog."), inputs(proc, "Describe this image.", (IMG_A,))]
    engine = Engine(m, max_batch=2, max_context=256)
    assert engine.cache.dtype == (torch.bfloat16 if bf16_cache else torch.float32)
    hs = [engine.submit(request(m, inp, max_new_tokens=8, eos_token_id=[])) for inp in inps]
    drain(engine)
    assert [tokens(h) for h in hs] == [alone(m, inp, max_new_tokens=8, eos_token_id=[]) for inp in inps]


@pytest.mark.skipif(kernels._cpu_problem() is not None, reason=f"no CPU kernels here: {kernels._cpu_problem()}")
def test_rows_take_the_fused_step_with_the_same_tokens(ckpt, proc, monkeypatch):
    """Rows decode through ``model.fused_decoder`` (one native call a step): a request running alone over its
    row of the shared cache, rows running together over rows 0..hi, each at its own slot; the tokens are
    those of ``generate_ids`` alone and of the engine without the fused step. A row's slots past its new
    token (a longer earlier request's, here) are never attended."""
    from smolvlm.model.upcast import gemv_text_linears

    assert kernels.build() is None
    monkeypatch.setitem(kernels._state, "use", None)  # the kernels on, as wherever they run (not AMX)
    m = SmolVLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert gemv_text_linears(m, force=True)  # float32 text linears on smolvlm's GEMV, as on AVX-512 CPUs
    calls = []
    op = torch.ops.smolvlm.decode_layers
    monkeypatch.setattr(torch.ops.smolvlm, "decode_layers", lambda *a: calls.append(a[9]) or op(*a))
    long, short = inputs(proc, "Tell me a long story about a cat and a dog."), inputs(proc, "Hi", (IMG_A,))
    engine = Engine(m, max_batch=2, max_context=256)
    first = engine.submit(request(m, long, max_new_tokens=12, eos_token_id=[]))
    drain(engine)  # alone: every step after the first token fused, at the row's next slot
    n, s = long["input_ids"].shape[1], short["input_ids"].shape[1]
    assert calls == [[k] for k in range(n, n + 11)]
    calls.clear()
    pair = [engine.submit(request(m, inp, max_new_tokens=k, eos_token_id=[])) for inp, k in ((short, 4), (long, 9))]
    drain(engine)  # together for 3 steps (rows 0 and 1, each at its slot), then the long one alone for its last 5
    assert calls == [[s + k, n + k] for k in range(3)] + [[n + k] for k in range(3, 8)]
    want = [alone(m, inp, max_new_tokens=k, eos_token_id=[]) for inp, k in ((long, 12), (short, 4), (long, 9))]
    assert [tokens(h) for h in (first, *pair)] == want
    monkeypatch.setattr(Engine, "_fused_step", lambda self, lo, hi: None)
    again = Engine(m, max_batch=2, max_context=256)
    h = again.submit(request(m, long, max_new_tokens=12, eos_token_id=[]))
    drain(again)
    assert tokens(h) == want[0]


def test_in_passing_thread_returns_raises_and_leaves_no_thread():
    import threading

    from smolvlm.generation.engine import in_passing_thread

    before = threading.active_count()
    assert in_passing_thread(lambda a, b=0: threading.current_thread().name + str(a + b), 1, b=2) == "smolvlm-load3"
    with pytest.raises(KeyError, match="boom"):
        in_passing_thread(lambda: {}["boom"])
    assert threading.active_count() == before


def test_an_image_arriving_mid_decode_is_encoded_a_slice_a_step_while_the_streams_go_on(model, proc):
    """While a row decodes, a new request's image tiles are encoded a slice per step (here one encoder
    layer of one tile: a zero-second slice), then its prompt a chunk per step, its row held; the running
    stream gets its token every step, and both answers are those of each request alone. A request
    cancelled, or whose pixels fail, while encoding frees its row."""
    engine = Engine(model, max_batch=3, max_context=256, feature_cache=FeatureCache(), slice_s=0.0)
    text, image = inputs(proc, "Tell me a long story about a cat and a dog."), inputs(proc, "Describe it.", (IMG_B,))
    n_tiles, n_layers = image["pixel_values"].shape[1], model.config.vision_config.num_hidden_layers
    chunks = -(-image["input_ids"].shape[1] // MIN_PREFILL_CHUNK)  # the last one samples the first token
    assert n_tiles > 2 and n_layers == 2 and chunks >= 2
    a = engine.submit(request(model, text, max_new_tokens=n_tiles * n_layers + chunks + 6, eos_token_id=[]))
    engine.step()
    b = engine.submit(request(model, image, max_new_tokens=4, eos_token_id=[]))
    for step in range(n_tiles * n_layers + chunks):
        engine.step()
        m = engine.metrics()
        done = min(step + 1, n_tiles * n_layers)  # encoder layers run
        assert m["feature_cache_misses"] == done // n_layers and m["vision_encoder_calls"] == -(-done // n_layers)
        assert m["prefill_chunks"] == max(step + 1 - n_tiles * n_layers, 0) - (step + 1 == n_tiles * n_layers + chunks)
        assert m["pending_rows"] == (1 if step + 1 < n_tiles * n_layers + chunks else 0)
        assert m["decode_steps"] == step + 2  # the text stream decoded every step
    held = next(row.req for row in engine.rows if row is not None and row.req.handle is b)
    assert held.pixel_values is None and held.image_features is None  # decoding holds neither any more
    drain(engine)
    assert tokens(a) == alone(model, text, max_new_tokens=n_tiles * n_layers + chunks + 6, eos_token_id=[])
    assert tokens(b) == alone(model, image, max_new_tokens=4, eos_token_id=[])

    long = engine.submit(request(model, text, max_new_tokens=20, eos_token_id=[]))
    engine.step()
    c = engine.submit(request(model, inputs(proc, "And this?", (IMG_A,)), max_new_tokens=4))
    engine.step()
    assert engine.metrics()["pending_rows"] == 1
    c.cancel()
    engine.step()
    assert c.finish.reason == "cancelled" and engine.metrics()["pending_rows"] == 0
    bad = dict(image, pixel_values=torch.rand(1, 2, 3, 40, 40))  # tiles of the wrong size: the encoder fails
    d = engine.submit(request(model, bad, max_new_tokens=4))
    engine.step()
    assert d.finish.reason == "error" and engine.metrics()["pending_rows"] == 0
    drain(engine)
    assert long.finish.reason == "length" and len(tokens(long)) == 20


def test_a_prompt_arriving_mid_decode_goes_in_chunks_even_below_a_decoding_row(model, proc):
    """While a row decodes, a newcomer's prompt is written ``prefill_chunk`` tokens a step (its image tiles
    first, a slice a step), into row 0 below the decoding row 1: that row decodes a dummy token each step at
    the slot the next chunk overwrites, never over the prompt already written. Every answer is the
    request's alone, and the decoding row gets a token every step."""
    engine = Engine(model, max_batch=2, max_context=256, feature_cache=FeatureCache(), slice_s=0.0,
                    prefill_chunk=8)
    short, text = inputs(proc, "Hi"), inputs(proc, "Tell me a long story about a cat and a dog.")
    image = inputs(proc, "Describe it.", (IMG_B,))
    n_layers = model.config.vision_config.num_hidden_layers
    a = engine.submit(request(model, short, max_new_tokens=2, eos_token_id=[]))
    b = engine.submit(request(model, text, max_new_tokens=70, eos_token_id=[]))
    engine.step()
    engine.step()
    assert a.done and engine.metrics()["active_rows"] == 1  # row 0 free, row 1 decoding
    for inp in (text, image):
        t, tiles = inp["input_ids"].shape[1], 0 if "pixel_values" not in inp else inp["pixel_values"].shape[1]
        before = engine.metrics()
        c = engine.submit(request(model, inp, max_new_tokens=3, eos_token_id=[]))
        chunks = (t + 7) // 8 - 1  # then the last one, through the prefill that samples the first token
        held = tiles * n_layers + chunks  # an encoder layer of a tile a step, then a chunk a step: row 0 held
        for _ in range(held):
            engine.step()
            assert engine.metrics()["pending_rows"] == 1
        engine.step()  # the last chunk: prefilled, its first token sampled
        m = engine.metrics()
        assert m["pending_rows"] == 0 and m["active_rows"] == 2
        assert m["prefill_chunks"] - before["prefill_chunks"] == chunks
        assert m["decode_steps"] - before["decode_steps"] == held + 1  # row 1 decoded every step
        for _ in range(3):  # row 1 (70 tokens) goes on decoding
            engine.step()
        assert c.done and tokens(c) == alone(model, inp, max_new_tokens=3, eos_token_id=[])
    # more images than the prompt's <image> tokens ask for: refused before its first chunk (each chunk sees
    # only its own feature rows), the row freed
    two = inputs(proc, "Compare.", (IMG_B, IMG_A))
    extra = dict(image, pixel_values=two["pixel_values"], pixel_attention_mask=two["pixel_attention_mask"])
    e = engine.submit(request(model, extra, max_new_tokens=4))
    for _ in range(two["pixel_values"].shape[1] * n_layers):
        engine.step()
    assert e.finish is not None and e.finish.reason == "error" and "do not match" in e.finish.error
    assert engine.metrics()["pending_rows"] == 0 and engine.metrics()["prefill_chunks"] == m["prefill_chunks"]
    drain(engine)
    assert tokens(b) == alone(model, text, max_new_tokens=70, eos_token_id=[])


def test_slices_that_never_end_put_a_prompt_in_at_once(model, proc):
    """``slice_s=inf`` and a chunk longer than any prompt: a newcomer goes in within its first step."""
    engine = Engine(model, max_batch=2, max_context=256, feature_cache=FeatureCache(), slice_s=float("inf"),
                    prefill_chunk=10 ** 9)
    text, image = inputs(proc, "Tell me a long story about a cat and a dog."), inputs(proc, "Describe it.", (IMG_B,))
    a = engine.submit(request(model, text, max_new_tokens=12, eos_token_id=[]))
    engine.step()
    b = engine.submit(request(model, image, max_new_tokens=4, eos_token_id=[]))
    engine.step()  # every tile's every encoder layer, the prompt, its first tokens
    assert engine.metrics()["pending_rows"] == 0 and engine.metrics()["prefill_chunks"] == 0
    assert any(isinstance(ev, TokenEvent) for ev in list(b._queue.queue))
    drain(engine)
    assert tokens(b) == alone(model, image, max_new_tokens=4, eos_token_id=[])
    assert tokens(a) == alone(model, text, max_new_tokens=12, eos_token_id=[])
    with pytest.raises(ValueError, match="prefill_chunk >= 1"):
        Engine(model, max_batch=1, max_context=64, prefill_chunk=0)


def test_tile_encoding_by_layers_matches_whole_tiles_and_the_cache(model, proc):
    """``TileEncoding.step``: one encoder layer of one tile a call; the features are ``encode``'s, each
    tile is counted once, and a tile begun by ``step`` is finished by ``encode``."""
    image = inputs(proc, "Describe it.", (IMG_B,))
    pv, pm = image["pixel_values"], image["pixel_attention_mask"]
    n_tiles, n_layers = pv.shape[1], model.config.vision_config.num_hidden_layers
    want = TileEncoding(FeatureCache(), model, pv, pm)
    want.encode()
    cache = FeatureCache()
    tiles = TileEncoding(cache, model, pv, pm)
    for call in range(n_layers * 2 + 1):  # two whole tiles, then the first layer of the third
        tiles.step()
        assert tiles.remaining == n_tiles - (call + 1) // n_layers
        assert (cache.misses, cache.encoder_calls) == ((call + 1) // n_layers, call // n_layers + 1)
    tiles.encode()  # the third tile's last layer, then the rest at once
    assert tiles.remaining == 0 and cache.misses == n_tiles and len(cache) == n_tiles
    assert torch.equal(tiles.features(), want.features())
    again = TileEncoding(cache, model, pv, pm)
    again.step()  # every tile cached: nothing to encode
    assert again.remaining == 0 and cache.encoder_calls == 3 + (n_tiles > 3) and torch.equal(again.features(), want.features())


def test_a_prompt_chunk_holds_what_the_slice_has_time_for(model):
    """A step's time for newcomers: ``slice_s``, by default ``SLICE_S`` or ``SLICE_PER_DECODE`` decode steps.
    The tokens of a prompt chunk: as many as the time left holds at the last measured rate, at most
    ``prefill_chunk``; at least ``MIN_PREFILL_CHUNK`` when the step has done nothing else; none measured
    yet: ``prefill_chunk`` tokens a slice."""
    import time

    engine = Engine(model, max_batch=1, max_context=64, slice_s=0.5, prefill_chunk=200)
    default = Engine(model, max_batch=1, max_context=64)
    assert engine._slice() == 0.5 and default._slice() == SLICE_S
    default._decode_s = SLICE_S  # a decode step longer than a quarter of the slice: 4 decode steps
    assert default._slice() == SLICE_PER_DECODE * SLICE_S
    now = time.perf_counter()
    # no rate measured yet: prefill_chunk tokens a slice (0.5 s / 200 tokens)
    assert engine._chunk_tokens(now + 10, worked=False) == 200
    assert 95 <= engine._chunk_tokens(time.perf_counter() + 0.25, worked=True) <= 100
    assert engine._chunk_tokens(time.perf_counter() + 0.05, worked=False) == MIN_PREFILL_CHUNK
    engine._token_s = 0.01
    assert 90 <= engine._chunk_tokens(time.perf_counter() + 1.0, worked=True) <= 100
    assert engine._chunk_tokens(time.perf_counter() + 10, worked=True) == 200  # the cap
    assert engine._chunk_tokens(time.perf_counter() + 0.1, worked=False) == MIN_PREFILL_CHUNK
    assert engine._chunk_tokens(time.perf_counter() - 1, worked=True) == 0  # the slice is spent
    assert engine._chunk_tokens(float("inf"), worked=True) == 200
    small = Engine(model, max_batch=1, max_context=64, prefill_chunk=8)
    assert small._chunk_tokens(time.perf_counter(), worked=False) == 8  # the cap under the minimum
    with pytest.raises(ValueError, match="slice_s >= 0"):
        Engine(model, max_batch=1, max_context=64, slice_s=float("nan"))


def test_short_prompts_arriving_together_mid_decode_go_in_together(model, proc):
    """A slice holds as many prompt tokens as the rate measured on the last prompt forward allows (here the
    decoding row's own prefill): a burst of short prompts arriving while a row decodes is prefilled in one
    step (one batched forward), not one a step."""
    engine = Engine(model, max_batch=4, max_context=256)
    text = inputs(proc, "Tell me a long story about a cat and a dog.")
    a = engine.submit(request(model, text, max_new_tokens=20, eos_token_id=[]))
    engine.step()
    assert engine._token_s is not None  # measured on that prefill
    short = [inputs(proc, f"Hi {i}") for i in range(3)]
    assert sum(x["input_ids"].shape[1] for x in short) < PREFILL_CHUNK // 2
    burst = [engine.submit(request(model, x, max_new_tokens=3, eos_token_id=[])) for x in short]
    before = engine.metrics()["prefill_forwards"]
    engine.step()
    m = engine.metrics()
    assert m["active_rows"] == 4 and m["pending_rows"] == 0 and m["prefill_forwards"] - before == 1
    drain(engine)
    assert all(len(tokens(h)) == 3 for h in burst) and len(tokens(a)) == 20


def test_a_question_arriving_while_an_image_is_encoded_on_an_idle_engine_starts_at_once(model, proc):
    """With nothing decoding, an image still goes in a slice a step (here one encoder layer): a short
    question arriving meanwhile is prefilled at the next step and decodes while the image goes on, instead
    of waiting for the whole image. Once its tiles are encoded, the image's prompt goes in too; both
    answers are each request's alone."""
    engine = Engine(model, max_batch=2, max_context=256, feature_cache=FeatureCache(), slice_s=0.0)
    image, text = inputs(proc, "Describe it.", (IMG_B,)), inputs(proc, "Hi")
    n_tiles, n_layers = image["pixel_values"].shape[1], model.config.vision_config.num_hidden_layers
    a = engine.submit(request(model, image, max_new_tokens=4, eos_token_id=[]))
    engine.step()
    assert engine.metrics()["pending_rows"] == 1 and engine.metrics()["active_rows"] == 0
    b = engine.submit(request(model, text, max_new_tokens=n_tiles * n_layers + 8, eos_token_id=[]))
    engine.step()
    m = engine.metrics()
    assert m["active_rows"] == 1 and m["pending_rows"] == 1 and m["decode_steps"] == 1  # the question decodes
    assert m["feature_cache_misses"] < n_tiles  # the image is still being encoded
    drain(engine)
    assert tokens(a) == alone(model, image, max_new_tokens=4, eos_token_id=[])
    assert tokens(b) == alone(model, text, max_new_tokens=n_tiles * n_layers + 8, eos_token_id=[])
