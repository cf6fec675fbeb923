"""Sampling functions vs transformers' logits processors, settings resolution, seeded draws."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from smolvlm.generation import sampling
from smolvlm.generation.config import GenerationSettings, resolve_settings

V = 97


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(3, V) * 3


def _seen(ids: torch.Tensor) -> torch.Tensor:
    seen = torch.zeros(ids.shape[0], V, dtype=torch.bool)
    return seen.scatter_(1, ids, True)


def test_repetition_penalty_matches_transformers(logits):
    ids = torch.randint(0, V, (3, 11))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    # exact: same elementwise ops
    assert_close(sampling.repetition_penalty(logits, _seen(ids), 1.3), ref, rtol=0, atol=0)


def test_repetition_penalty_sign_semantics():
    lg = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert sampling.repetition_penalty(lg, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("t", [0.5, 1.0, 1.7])
def test_temperature(logits, t):
    assert_close(sampling.temperature(logits, t), TemperatureLogitsWarper(t)(None, logits.clone()))


@pytest.mark.parametrize("k", [1, 5, 50, 200])
def test_top_k(logits, k):
    assert torch.equal(sampling.top_k(logits, k), TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_top_p(logits, p):
    assert torch.equal(sampling.top_p(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_min_p(logits, p):
    assert torch.equal(sampling.min_p(logits, p), MinPLogitsWarper(p)(None, logits.clone()))


def test_disabled_filters_are_identity(logits):
    for out in (sampling.top_k(logits, None), sampling.top_k(logits, 0), sampling.top_p(logits, 1.0),
                sampling.top_p(logits, None), sampling.min_p(logits, None), sampling.temperature(logits, 1.0)):
        assert torch.equal(out, logits)


def test_process_logits_greedy_ignores_warpers(logits):
    s = GenerationSettings(do_sample=False, temperature=0.3, top_k=2)
    assert torch.equal(sampling.process_logits(logits, s, None), logits)


def test_seeded_sampling_reproducible_and_matches_global_seed(logits):
    s = GenerationSettings(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    scores = sampling.process_logits(logits, s, None)
    a = [sampling.select_token(scores, True, g) for g in [sampling.make_generator(7)] * 5]
    g = sampling.make_generator(7)
    b = [sampling.select_token(scores, True, g) for _ in range(5)]
    torch.manual_seed(7)  # transformers draws with torch.multinomial on the global RNG
    c = [torch.multinomial(scores.softmax(-1), 1).squeeze(1) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(b, c))
    assert len({tuple(t.tolist()) for t in a}) >= 2  # draws differ step to step
    finite = torch.isfinite(scores)
    assert all(finite.gather(1, t[:, None]).all() for t in b)  # never a filtered token


def test_greedy_is_argmax(logits):
    assert torch.equal(sampling.select_token(logits, False), logits.argmax(-1))


def _model(gen=None, eos=2, max_pos=100):
    tc = SimpleNamespace(eos_token_id=eos, max_position_embeddings=max_pos, vocab_size=V)
    return SimpleNamespace(config=SimpleNamespace(text_config=tc), generation_config=gen)


def test_resolve_defaults_follow_reference():
    s = resolve_settings(_model({"eos_token_id": 49279, "pad_token_id": 2}), 10)
    assert (s.max_new_tokens, s.eos_token_ids, s.pad_token_id, s.do_sample) == (20, (49279,), 2, False)
    s = resolve_settings(_model(None, eos=[5, 6]), 10, do_sample=True)
    assert (s.eos_token_ids, s.pad_token_id, s.top_k) == ((5, 6), 5, 50)  # pad falls back to eos[0]
    s = resolve_settings(_model({"max_length": 15}), 10)
    assert s.max_new_tokens == 5
    s = resolve_settings(_model({"eos_token_id": [1, 3]}), 10, eos_token_id=9, max_new_tokens=4, stop_strings="x")
    assert (s.eos_token_ids, s.max_new_tokens, s.stop_strings) == ((9,), 4, ("x",))


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(do_sample=True, temperature=0.0), dict(top_p=1.5),
                                dict(min_p=-0.1), dict(repetition_penalty=0.0), dict(top_k=-1),
                                dict(stop_strings=[""])])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError):
        resolve_settings(_model(), 3, **kw)
