"""`smolvlm eval` / ``evaluation.evaluate`` on a tiny random checkpoint and the synthetic eval split.

The tiny checkpoint (64 px tiles, 2-layer text model; ``build_tiny_checkpoint``) answers nonsense,
so real scores are 0; the oracle tests replace generation by the gold answers to prove the
scoring and bookkeeping reach 1.0. Torch runs on one thread here: the test machine is shared and
two threads on a busy box made these tiny matmuls ~50x slower.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from smolvlm import SmolVLM, SmolVLMProcessor, synth
from smolvlm.cli.main import main
from smolvlm.data.cauldron import sample_to_messages
from smolvlm.evaluation import runner
from smolvlm.evaluation.runner import EvalConfig, decode_answer, evaluate
from smolvlm.evaluation.tasks import synth as synth_task
from smolvlm.training.data import assistant_char_spans
from tests.conftest import REPO
from tests.helpers import build_tiny_checkpoint

N = 8  # samples: one of each of the 7 categories + a second "shapes"
KEYS = {"model", "task", "n", "n_requests", "overall", "overall_metric", "macro", "n_overall", "per_category",
        "excluded_from_overall", "examples", "settings", "git_commit", "seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ref256) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("eval256"), ref256)


@pytest.fixture(scope="module")
def model(ckpt):
    return SmolVLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def proc(ckpt):
    return SmolVLMProcessor.from_pretrained(ckpt)


def _cfg(**kw) -> EvalConfig:
    return EvalConfig(**{"n": N, "batch_size": 4, "num_examples": 100, "progress": False, **kw})


@pytest.fixture(scope="module")
def results(model, proc):
    return evaluate(model, proc, _cfg(), model_name="tiny")


def _predictions(res: dict) -> list[tuple[str, str]]:
    return [(e["id"], e["prediction"]) for e in res["examples"]]


def test_results_structure(results):
    samples = synth.make_dataset(N, "eval", 0)
    n_turns = sum(len(s["texts"]) for s in samples)
    n_captions = sum(len(s["texts"]) for s in samples if s["category"] == "caption")
    assert set(results) == KEYS
    assert (results["model"], results["task"], results["n"]) == ("tiny", "synth", N)
    assert results["n_requests"] == n_turns and results["n_overall"] == n_turns - n_captions
    assert list(results["per_category"]) == list(synth.CATEGORIES)
    assert sum(v["n"] for v in results["per_category"].values()) == n_turns
    cap = results["per_category"]["caption"]
    assert (cap["metric"], cap["headline"]) == ("anls", False) and results["excluded_from_overall"] == ["caption"]
    for cat, v in results["per_category"].items():
        assert 0.0 <= v["score"] <= 1.0 and v["metric"] == ("anls" if cat == "caption" else "exact_match")
    assert 0.0 <= results["overall"] <= 1.0 and results["overall_metric"] == "exact_match"
    # every request appears once in task order (num_examples=100 keeps them all), with its gold
    golds = [(f"{s['id']}/{k}", t["assistant"]) for s in samples for k, t in enumerate(s["texts"])]
    assert [(e["id"], e["gold"]) for e in results["examples"]] == golds
    assert all(synth.split_of_seed(int(e["id"].split("/")[0].rsplit("-", 1)[1])) == "eval"
               for e in results["examples"])
    assert all(set(e) == {"id", "category", "question", "gold", "prediction", "score"} for e in results["examples"])
    assert results["settings"]["split"] == "eval" and results["settings"]["max_new_tokens"] == 16
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", results["git_commit"])
    assert results["seconds"] > 0
    json.dumps(results)  # serialisable as is


def test_deterministic(model, proc, results):
    again = evaluate(model, proc, _cfg(), model_name="tiny")
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(again) == strip(results)


def test_batched_equals_batch_size_one(model, proc, results):
    # left padding + masks must not change greedy answers (the tiny model's std-0.2 init keeps
    # logits far apart, so float rounding across batch shapes cannot flip an argmax)
    single = evaluate(model, proc, _cfg(batch_size=1, feature_cache=False), model_name="tiny")
    assert _predictions(single) == _predictions(results)
    assert all(p for _, p in _predictions(results))  # non-empty: the tiny model never emits eos early


def test_prompts_are_the_training_prefixes(proc):
    """Turn k is asked with the gold history: its rendered prompt is exactly the training text that
    precedes the k-th answer (data.assistant_char_spans locates answers the way training labels them)."""
    sample = next(s for s in synth.make_dataset(N, "eval", 0) if len(s["texts"]) == 3)
    for system in (None, "Answer briefly."):
        full, spans = assistant_char_spans(proc.apply_chat_template, sample_to_messages(sample, system))
        reqs = synth_task.sample_requests(sample, 16, 48, system)
        assert len(reqs) == 3
        for (start, _), r in zip(spans, reqs):
            assert proc.apply_chat_template(r.messages, add_generation_prompt=True) == full[:start]
            assert r.images == sample["images"]


def _token_oracle(monkeypatch, proc, wrong: set[str] = frozenset()):
    """Replace the model's generation by the gold answer's tokens (+ <end_of_utterance>, pad): runs
    the real encode -> slice -> decode path. Categories in ``wrong`` get a wrong answer."""
    batches: list = []
    real_encode = runner.encode_batch

    def encode(processor, batch, **kw):
        batches.append(list(batch))
        return real_encode(processor, batch, **kw)

    def fake_generate_ids(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                          max_new_tokens=None, eos_token_id=None, **kw):
        batch = batches.pop(0)
        eou = proc.tokenizer.token_to_id("<end_of_utterance>")
        assert eou in eos_token_id and max_new_tokens == batch[0].max_new_tokens
        rows = [proc.tokenizer.encode(" " + ("wrong" if r.category in wrong else r.gold)) + [eou] for r in batch]
        width = max(len(x) for x in rows)
        new = torch.tensor([(x + [2] * width)[:width] for x in rows])[:, :max_new_tokens]  # pad 2 after eos
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(runner, "encode_batch", encode)
    monkeypatch.setattr(runner, "generate_ids", fake_generate_ids)


def test_perfect_oracle_scores_one(monkeypatch, model, proc):
    _token_oracle(monkeypatch, proc)
    res = evaluate(model, proc, _cfg(batch_size=3), model_name="oracle")
    assert res["overall"] == 1.0 and res["macro"] == 1.0
    assert all(v["score"] == 1.0 for v in res["per_category"].values())  # caption: ANLS 1.0
    assert all(e["prediction"] == e["gold"] for e in res["examples"])


def test_batches_ask_for_the_models_pixel_dtype(monkeypatch, model, proc):
    """Each batch's pixels are built in the model's dtype (no float32 batch of every image's tiles):
    the reference's values cast, bit for bit, with a bool mask."""
    seen = []
    real = runner.encode_batch

    def encode(processor, batch, **kw):
        out = real(processor, batch, **kw)
        seen.append((kw, out, real(processor, batch)))
        return out

    monkeypatch.setattr(runner, "encode_batch", encode)
    evaluate(model, proc, _cfg(batch_size=3, num_examples=3), model_name="tiny")
    assert seen and all(kw == {"pixel_dtype": model.dtype} for kw, _, _ in seen)
    for _, got, ref in seen:
        assert torch.equal(got["pixel_values"], ref["pixel_values"].to(model.dtype))
        assert torch.equal(got["pixel_attention_mask"], ref["pixel_attention_mask"] != 0)


def test_partial_oracle_bookkeeping(monkeypatch, model, proc):
    _token_oracle(monkeypatch, proc, wrong={"shapes", "caption"})
    res = evaluate(model, proc, _cfg(batch_size=5), model_name="oracle")
    per = res["per_category"]
    assert per["shapes"]["score"] == 0.0 and per["caption"]["score"] == 0.0
    assert all(per[c]["score"] == 1.0 for c in synth.CATEGORIES if c not in ("shapes", "caption"))
    assert res["overall"] == pytest.approx(1 - per["shapes"]["n"] / res["n_overall"])


def test_decode_answer_cuts_at_eos(proc):
    eou = proc.tokenizer.token_to_id("<end_of_utterance>")
    ids = proc.tokenizer.encode(" 14.90") + [eou] + proc.tokenizer.encode(" junk")
    assert decode_answer(proc, ids, [eou]) == "14.90"
    assert decode_answer(proc, [eou, 5, 6], [eou]) == ""


def test_bad_config():
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="unknown evaluation task"):
        EvalConfig(task="nope").validate()
    with pytest.raises(ValueError, match="n .*>= 1"):
        synth_task.build_requests(0)


def test_cli_end_to_end(ckpt, results, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", str(ckpt), "--n", str(N), "--batch-size", "4", "--threads", "1",
               "--output", str(out), "--examples", "100", "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0
    saved = json.loads(out.read_text())
    assert set(saved) == KEYS and _predictions(saved) == _predictions(results)
    assert saved["per_category"] == results["per_category"] and saved["overall"] == results["overall"]
    for cat in synth.CATEGORIES:
        assert re.search(rf"^{cat}\b.*\s{saved['per_category'][cat]['n']}\s+\d\.\d{{4}}$", stdout, re.M), cat
    assert re.search(r"^overall\s+exact_match\s+\d+\s+0\.0000$", stdout, re.M)


def test_cli_threshold_fails_with_one_line(ckpt, capsys):
    rc = main(["eval", "--model", str(ckpt), "--n", "2", "--threads", "1", "--no-progress",
               "--min-overall", "0.5", "--min-category", "0.25"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1
    assert err.startswith("smolvlm eval: FAILED: overall 0.0000 < --min-overall 0.5; shapes 0.0000 < --min-category")


def test_cli_bad_flag_before_loading(capsys):
    rc = main(["eval", "--model", "/nonexistent/ckpt", "--batch-size", "0"])
    assert rc == 2 and "batch_size must be >= 1" in capsys.readouterr().err
