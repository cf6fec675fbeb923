"""Text-only replay (training/replay.py, synth/chat.py): prompts, the backbone's chat
format, answer post-processing, the cache, and the mixed training set of a recipe run."""

from __future__ import annotations

import json

import pytest
import torch

from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.synth.chat import chat_prompts
from smolvlm.training import replay
from smolvlm.training.build import build_run, prepare_replay, run_recipe
from smolvlm.training.recipe import RecipeError, recipe_from_dict
from tests.helpers import tiny_recipe


def test_chat_prompts_are_deterministic_distinct_prefixes():
    a, b = chat_prompts(50), chat_prompts(50)
    assert a == b and len(set(a)) == 50
    assert chat_prompts(80)[:50] == a  # growing n only appends
    assert chat_prompts(50, seed=1) != a
    # pinned: the shipped default model was trained on answers to exactly these prompts
    assert a[:4] == ["What is 1 + 6?", "Why is being kind important?", "What colour is chocolate?",
                     "What is the capital of Vietnam?"]
    assert all(isinstance(p, str) and p.strip() == p and p for p in a)
    with pytest.raises(ValueError, match="distinct chat prompts"):
        chat_prompts(10_000)
    with pytest.raises(ValueError, match="n must be"):
        chat_prompts(-1)


def test_gguf_chat_template_is_smollm2_chatml():
    """The shipped GGUF carries SmolLM2-Instruct's template; our fallback is the same text, and a
    rendered prompt ends where the assistant answers."""
    t = replay.backbone_chat_template("gguf:smollm2")
    assert t == replay.CHATML_TEMPLATE
    (s,) = replay.render_prompts(t, ["Name three fruits."])
    assert s == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\nName three fruits.<|im_end|>\n<|im_start|>assistant\n")
    assert replay.backbone_chat_template("random") == replay.CHATML_TEMPLATE
    with pytest.raises(replay.ReplayError, match="needs a GGUF text backbone"):
        replay.backbone_chat_template("runs/some-smolvlm-folder")


def test_backbone_answers_pads_left_decodes_and_drops_unfinished(ref256, monkeypatch):
    """Post-processing around generation: prompts left-padded with a mask, answers cut at
    <|im_end|>, unfinished ones None, the model's train/eval mode restored."""
    processor = SmolVLMProcessor.from_pretrained(ref256)
    tok = processor.tokenizer
    end = tok.token_to_id(replay.IM_END)
    words = [tok.encode(w) for w in ("Hello there.", " Apples", "never ends")]
    seen = {}

    def fake_generate(model, input_ids, mask, **kw):
        seen.update(ids=input_ids.clone(), mask=mask.clone(), kw=kw)
        assert not model.training
        rows = [words[0] + [end, end], words[1] + [end] + [end] * (len(words[0]) + 1 - len(words[1])),
                (words[2] * 4)[: len(words[0]) + 2]]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    monkeypatch.setattr(replay, "generate_ids", fake_generate)
    model = torch.nn.Linear(1, 1).train()
    prompts = ["Hi", "Name three fruits, please, and say why.", "Go on forever."]
    out = replay.backbone_answers(model, processor, prompts, replay.CHATML_TEMPLATE, max_new_tokens=7, batch_size=3)
    assert out == ["Hello there.", "Apples", None]
    assert model.training
    assert seen["kw"]["eos_token_id"] == end and seen["kw"]["max_new_tokens"] == 7 and not seen["kw"]["do_sample"]
    lens = [len(tok.encode(s)) for s in replay.render_prompts(replay.CHATML_TEMPLATE, prompts)]
    assert seen["mask"].sum(1).tolist() == lens and seen["mask"][:, -1].all()  # left padding
    row0 = seen["ids"][0][seen["mask"][0] == 1].tolist()
    assert row0 == tok.encode(replay.render_prompts(replay.CHATML_TEMPLATE, prompts[:1])[0])


def test_replay_cache_is_reused_and_checked(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return ["Hi", "Name two birds.", "Long one"], ["Hello!", "Owls and crows.", None]

    path = tmp_path / "replay.json"
    s1 = replay.load_or_make(path, {"n": 3}, make)
    assert [x["texts"][0]["assistant"] for x in s1] == ["Hello!", "Owls and crows."]  # unfinished dropped
    assert all(x["images"] == [] and x["category"] == "chat" for x in s1)
    assert replay.load_or_make(path, {"n": 3}, make) == s1 and len(calls) == 1  # cached
    with pytest.raises(replay.ReplayError, match="other settings"):
        replay.load_or_make(path, {"n": 4}, make)
    path.write_text("{not json")
    with pytest.raises(replay.ReplayError, match="not a readable replay file"):
        replay.load_or_make(path, {"n": 3}, make)


def test_recipe_run_mixes_replay_and_resumes_on_the_same_data(ref256, tmp_path):
    """A tiny run with replay: the backbone's answers are cached before training, text-only
    samples join the training set, and a resumed run finds the same cache."""
    d = tiny_recipe(ref256, tmp_path / "r", max_steps=2, checkpoint_every=1)
    d["replay"] = {"n": 4, "max_new_tokens": 3, "batch_size": 2}
    d["freeze"]["train"] = ["model.connector"]
    run_recipe(recipe_from_dict(d), stop_at=1)
    cache = json.loads((tmp_path / "r" / "replay.json").read_text())
    assert cache["prompts"] == chat_prompts(4) and len(cache["answers"]) == 4
    assert cache["settings"]["replay"]["n"] == 4
    before = (tmp_path / "r" / "replay.json").read_text()
    assert run_recipe(recipe_from_dict(d), resume=True).step == 2
    assert (tmp_path / "r" / "replay.json").read_text() == before
    d["replay"]["max_new_tokens"] = 5
    saved = (tmp_path / "r" / "recipe.yaml").read_text()
    with pytest.raises(replay.ReplayError, match="other settings"):
        run_recipe(recipe_from_dict(d), resume=True)
    assert (tmp_path / "r" / "recipe.yaml").read_text() == saved  # refused before anything is written
    with pytest.raises(RecipeError, match="replay.n"):
        recipe_from_dict({**d, "replay": {"n": -1}})
    with pytest.raises(RecipeError, match="needs a GGUF text backbone"):  # found before any model is built
        recipe_from_dict({**d, "model": {**d["model"], "checkpoint": str(tmp_path / "some-smolvlm")}})


def test_prepare_replay_adds_text_only_samples_trained_on_the_answer(ref256, tmp_path):
    """Cached answers (the tiny random backbone rarely finishes one) join the training set as
    text-only samples whose labels cover exactly the answer and its <end_of_utterance>."""
    d = tiny_recipe(ref256, tmp_path / "p")
    d["replay"] = {"n": 3, "max_new_tokens": 8}
    recipe = recipe_from_dict(d)
    settings = {"replay": {"n": 3, "max_new_tokens": 8, "batch_size": 16, "seed": 0}, "text_backbone": "random"}
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "replay.json").write_text(json.dumps(
        {"settings": settings, "prompts": chat_prompts(3), "answers": ["Seven.", None, "Paris is the capital."]}))
    parts = build_run(recipe)
    n_img = len(parts.train_data)
    assert prepare_replay(parts, recipe) == 2 and len(parts.train_data) == n_img + 2
    s = parts.train_data[n_img + 1]
    assert "pixel_values" not in s
    tok = parts.processor.tokenizer
    assert tok.decode(s["input_ids"][s["labels"] != -100].tolist()) == " Paris is the capital.<end_of_utterance>"
    assert chat_prompts(3)[2] in tok.decode(s["input_ids"].tolist())
