"""Training: assistant-only labels, collation, freezing, schedule, checkpoints, exact resume, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.data.cauldron import sample_to_messages
from smolvlm.model.vlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.training import checkpoint as ckpt
from smolvlm.training import optim, sft
from smolvlm.training.build import run_recipe, write_processor_files
from smolvlm.training.collate import CollateError, collate
from smolvlm.training.data import DataError, encode_sample, make_samples
from smolvlm.training.recipe import (ModelRecipe, OptimRecipe, RecipeError, ScheduleRecipe, TrainRecipe,
                                     load_recipe, recipe_from_dict)
from tests.helpers import TINY_TEXT, TINY_VISION, tiny_recipe

REPO = Path(__file__).resolve().parents[2]
EOU = "<end_of_utterance>"




@pytest.fixture(scope="module")
def processor(ref256, tmp_path_factory) -> SmolVLMProcessor:
    """The published 256M tokenizer/template with 32 px tiles and S = 4 (tiny, fast)."""
    mr = ModelRecipe(tokenizer=str(ref256), processor={"do_image_splitting": False, "size": {"longest_edge": 32}})
    return SmolVLMProcessor.from_pretrained(write_processor_files(mr, 32, 4, tmp_path_factory.mktemp("proc")))


def tiny_model(vocab: int = 49280, seed: int = 0) -> SmolVLM:
    cfg = SmolVLMConfig(vision_config=VisionConfig(**TINY_VISION),
                        text_config=TextConfig(vocab_size=vocab, pad_token_id=2, **TINY_TEXT),
                        image_token_id=49190, scale_factor=2)
    torch.manual_seed(seed)
    return SmolVLM.from_config(cfg).train()


# -- labels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_exactly_assistant_tokens_are_trained(processor, system):
    samples = make_samples("synth", 7, "train", 0)  # one of each category: multi-turn, 2 images, captions
    tok = processor.tokenizer
    for s in samples:
        enc = encode_sample(s, processor, system_prompt=system)
        ids, labels = enc["input_ids"], enc["labels"]
        trained = labels != -100
        assert torch.equal(labels[trained], ids[trained])  # targets are the tokens themselves
        # the trained ids are exactly " {answer}<end_of_utterance>" of every turn, in order
        want = [t for turn in s["texts"] for t in tok.encode(" " + turn["assistant"] + EOU)]
        assert ids[trained].tolist() == want, s["id"]
        # nothing else: no image, user, system or template token is a target
        assert not bool(trained[ids == processor.image_token_id].any())
        assert int(trained.sum()) == len(want)
        assert enc["pixel_values"].shape[0] == len(s["images"])


def test_messages_layout():
    s = {"images": [object(), object()], "texts": [{"user": "q1", "assistant": "a1"}, {"user": "q2", "assistant": "a2"}]}
    m = sample_to_messages(s, system_prompt="sys")
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant"]
    assert [c["type"] for c in m[1]["content"]] == ["image", "image", "text"]
    assert [c["type"] for c in m[3]["content"]] == ["text"]
    with pytest.raises(DataError, match="no 'texts'"):
        sample_to_messages({"images": [], "texts": []})


# -- collate ---------------------------------------------------------------------------------
def test_collate_pads_text_and_images():
    a = {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
         "labels": torch.tensor([-100, 6, 7]), "pixel_values": torch.ones(2, 3, 4, 4),
         "pixel_attention_mask": torch.ones(2, 4, 4, dtype=torch.long)}
    b = {"input_ids": torch.tensor([5]), "attention_mask": torch.ones(1, dtype=torch.long), "labels": torch.tensor([5]),
         "pixel_values": torch.ones(1, 3, 4, 4), "pixel_attention_mask": torch.ones(1, 4, 4, dtype=torch.long)}
    out = collate([a, b], pad_token_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7], [5, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert out["pixel_values"].shape == (2, 2, 3, 4, 4)
    assert bool((out["pixel_values"][1, 1] == 0).all()) and int(out["pixel_attention_mask"][1, 1].sum()) == 0
    left = collate([a, b], pad_token_id=2, padding_side="left")
    assert left["input_ids"][1].tolist() == [2, 2, 5]
    cut = collate([a, b], pad_token_id=2, max_length=2, image_token_id=99)
    assert cut["input_ids"].shape == (2, 2)
    with pytest.raises(CollateError, match="inside an image"):
        collate([a], pad_token_id=2, max_length=2, image_token_id=7)


# -- optimisation pieces ------------------------------------------------------------------------
def _batch(processor, n=2):
    samples = make_samples("synth", n, "train", 3)
    return collate([encode_sample(s, processor) for s in samples], pad_token_id=2)


def test_loss_without_full_logits_equals_the_full_loss(processor):
    """return_logits=False runs the head at target positions only: same loss and same gradients."""
    model = tiny_model()
    batch = _batch(processor)
    full = model(**batch)
    full.loss.backward()
    g_full = model.model.connector.modality_projection.proj.weight.grad.clone()
    model.zero_grad()
    lean = model(**batch, return_logits=False)
    lean.loss.backward()
    assert lean.logits is None
    assert_close(lean.loss, full.loss, rtol=1e-6, atol=1e-6)  # same fp32 terms, summed in another order
    assert_close(model.model.connector.modality_projection.proj.weight.grad, g_full, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs labels"):
        model(input_ids=batch["input_ids"], return_logits=False)


def test_freezing_keeps_frozen_params_bit_identical(processor):
    model = tiny_model()
    counts = sft.apply_freezing(model, freeze=["model.text_model", "lm_head"], train=["model.text_model.norm"])
    assert counts["trainable"] > 0
    new_rows = [49190, 49279]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sft.train_embedding_rows(model, ["model.text_model.embed_tokens.weight"], new_rows)
    opt = optim.build_optimizer(model, OptimRecipe(lr=1e-2, weight_decay=0.1))
    sched = optim.build_scheduler(opt, ScheduleRecipe(kind="constant"), 3)
    batch = _batch(processor)
    for _ in range(3):
        sft.train_step(model, [batch], opt, sched, grad_clip=1.0)
    assert sft.merge_embedding_rows(model) == 1
    after = dict(model.named_parameters())
    for n, p in after.items():
        if n == "model.text_model.embed_tokens.weight":
            keep = torch.ones(p.shape[0], dtype=torch.bool)
            keep[new_rows] = False
            assert torch.equal(p[keep], before[n][keep])  # untouched rows: bit-identical
            assert not torch.equal(p[new_rows], before[n][new_rows])
        elif n.startswith(("model.text_model.layers", "lm_head")):
            assert torch.equal(p, before[n]), n  # frozen: bit-identical
        else:  # vision, connector, final norm
            assert not torch.equal(p, before[n]), n
    with pytest.raises(sft.TrainError, match="matches no parameter"):
        sft.apply_freezing(model, freeze=["model.txt_model"])


def test_loss_decreases_on_tiny_batch(processor):
    model = tiny_model(seed=1)
    opt = optim.build_optimizer(model, OptimRecipe(lr=1e-2))
    sched = optim.build_scheduler(opt, ScheduleRecipe(kind="constant"), 25)
    batch = _batch(processor)
    losses = [sft.train_step(model, [batch], opt, sched, grad_clip=1.0)["loss"] for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_grad_accumulation_matches_big_batch_and_checkpointing_matches(processor):
    """Token-weighted accumulation over 2 micro-batches == one batch of both; gradient
    checkpointing recomputes the same graph, so gradients agree (fp32, rounding-level: 1e-6)."""
    batch = _batch(processor, 2)
    halves = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]

    def grads(model, micro):
        n = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
        for b, k in zip(micro, n):
            (model(**b).loss * k / sum(n)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    ref = grads(tiny_model(seed=2), [batch])
    acc = grads(tiny_model(seed=2), halves)
    ckm = tiny_model(seed=2)
    assert sft.enable_gradient_checkpointing(ckm) == 4  # 2 text + 2 vision layers
    ck = grads(ckm, [batch])
    for name in ref:
        assert_close(acc[name], ref[name], rtol=1e-5, atol=1e-6)
        assert_close(ck[name], ref[name], rtol=1e-5, atol=1e-6)


def test_schedule_warmup_then_cosine():
    s = ScheduleRecipe(kind="cosine", warmup_steps=2, min_lr_ratio=0.1)
    f = [optim.lr_factor(i, s, 10) for i in range(11)]
    assert f[0] == 0.0 and f[1] == 0.5 and f[2] == 1.0  # linear warmup from 0, as transformers
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and abs(f[10] - 0.1) < 1e-12
    assert abs(f[6] - (0.1 + 0.9 * 0.5)) < 1e-12  # cosine midpoint


def test_param_groups_lrs_and_no_decay():
    model = tiny_model()
    groups = optim.param_groups(model, OptimRecipe(lr=1e-4, weight_decay=0.1, lr_groups={"model.vision_model": 1e-3}))
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    assert by_name["model.vision_model.encoder.layers.0.mlp.fc1.weight"] == (1e-3, 0.1)
    assert by_name["model.vision_model.encoder.layers.0.mlp.fc1.bias"] == (1e-3, 0.0)
    assert by_name["model.text_model.layers.0.input_layernorm.weight"] == (1e-4, 0.0)
    assert by_name["lm_head.weight"] == (1e-4, 0.1)


def test_data_order_is_a_function_of_position():
    o = sft.DataOrder(5, seed=3)
    full = o.indices(0, 12)
    assert sorted(full[:5]) == list(range(5)) and sorted(full[5:10]) == list(range(5))
    assert sft.DataOrder(5, seed=3).indices(7, 5) == full[7:12]


# -- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_keep_last_temp_and_fingerprint(tmp_path):
    model = tiny_model()
    sft.apply_freezing(model, freeze=["model.text_model"])
    opt = optim.build_optimizer(model, OptimRecipe())
    sched = optim.build_scheduler(opt, ScheduleRecipe(), 10)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {"samples_seen": step}, keep_last=2)
    (tmp_path / ".tmp-step-00000004").mkdir()  # a save killed half-way
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    ckpt.clean_temp(tmp_path)
    assert not (tmp_path / ".tmp-step-00000004").exists()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model, opt, sched)
    assert state["step"] == 3 and state["samples_seen"] == 3
    with torch.no_grad():
        model.model.text_model.norm.weight.add_(1.0)  # a different frozen base
    with pytest.raises(ckpt.CheckpointError, match="frozen weights differ"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model, opt, sched)


def test_killed_and_resumed_run_equals_straight_run(ref256, tmp_path):
    straight = run_recipe(recipe_from_dict(tiny_recipe(ref256, tmp_path / "a")))
    assert straight.step == 6
    first = run_recipe(recipe_from_dict(tiny_recipe(ref256, tmp_path / "b")), stop_at=3)
    assert first.step == 3 and not (tmp_path / "b" / "final").exists()
    torch.manual_seed(12345)  # scramble the global RNG: resume must restore it from the checkpoint
    with pytest.raises(sft.TrainError, match="--resume"):
        run_recipe(recipe_from_dict(tiny_recipe(ref256, tmp_path / "b")))
    resumed = run_recipe(recipe_from_dict(tiny_recipe(ref256, tmp_path / "b")), resume=True)  # new objects
    assert resumed.step == 6
    a, b = (ckpt.checkpoint_dir(tmp_path / r / "checkpoints", 6) for r in "ab")
    wa, wb = load_file(str(a / "trainable.safetensors")), load_file(str(b / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and any(".lora_B." in k for k in wa)
    for k in wa:
        # same ops on the same data in the same order on CPU: expected bit-identical; 1e-7 only
        # leaves room for nothing but the last fp32 bit
        assert_close(wb[k], wa[k], rtol=0, atol=1e-7)
    fa, fb = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in "ab")
    for k in fa:
        assert_close(fb[k], fa[k], rtol=0, atol=1e-7)
    oa, ob = (torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b))
    for i in oa["state"]:
        assert_close(ob["state"][i]["exp_avg_sq"], oa["state"][i]["exp_avg_sq"], rtol=0, atol=1e-9)
    la, lb = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lb] == [r["loss"] for r in la]
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "b" / "adapter" / "adapter_config.json").is_file()
    # the exported model loads (LoRA merged) with its processor files
    m = SmolVLM.from_pretrained(tmp_path / "b" / "final")
    assert not any(".lora_" in k for k in m.state_dict())
    SmolVLMProcessor.from_pretrained(tmp_path / "b" / "final")


# -- recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(path):
    r = load_recipe(path)
    assert r.train.max_steps >= 1 and r.train.batch_size >= 1


def test_default_model_recipe_values():
    r = load_recipe(REPO / "configs" / "default-model.yaml")
    assert r.model.text_backbone == "gguf:smollm2"
    v = r.model.vision
    assert (v["image_size"] // v["patch_size"] // r.model.scale_factor) ** 2 == 36  # 36 tokens per image
    assert r.model.processor["do_image_splitting"] is False  # one tile per image on CPU
    assert r.lora.enabled and "model.text_model" in r.freeze.freeze
    # two stages: dense + word-target vision pretraining, then the LM stage with tower and connector
    # frozen (the connector keeps its outputs on the words), bf16 only where the CPU has it natively
    assert r.vision_pretrain.steps > 0 and r.vision_pretrain.word_weight > 0
    assert {"model.vision_model", "model.connector"} <= set(r.freeze.freeze) and not r.freeze.train
    assert r.train.autocast == "auto"
    assert r.replay.n > 0  # text-only replay of the backbone's answers keeps chat fluent
    assert (REPO / r.model.tokenizer / "tokenizer.json").is_file()  # the shipped tokenizer, not ../shared


def test_recipe_errors_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  max_steps: 5\n")
    r = load_recipe(p, ["train.max_steps=7", "optim.lr=1e-3", "lora.targets=[q_proj, v_proj]", "model.vision={hidden_size: 8}"])
    assert r.train.max_steps == 7 and r.optim.lr == 1e-3 and r.lora.targets == ["q_proj", "v_proj"]
    assert r.model.vision == {"hidden_size": 8}
    with pytest.raises(RecipeError, match=r"unknown key\(s\) train.max_stepz"):
        load_recipe(p, ["train.max_stepz=3"])
    with pytest.raises(RecipeError, match="unknown key.*bogus"):
        load_recipe(p, ["bogus.x=3"])
    with pytest.raises(RecipeError, match="train.batch_size: expected an integer"):
        load_recipe(p, ["train.batch_size=two"])
    with pytest.raises(RecipeError, match="not one of"):
        load_recipe(p, ["train.autocast=fp8"])
    with pytest.raises(RecipeError, match="must look like"):
        load_recipe(p, ["train.max_steps"])
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")
    assert isinstance(recipe_from_dict({}).train, TrainRecipe)


def test_data_categories_restrict_the_synthetic_mix(tmp_path):
    """``data.categories`` trains on a subset, round-robin, with the same seeds as
    ``synth.make_dataset(..., categories)``; an unknown name is a recipe error up front."""
    from smolvlm import synth

    samples = make_samples("synth", 5, "train", 0, ["text", "form"])
    assert [s["category"] for s in samples] == ["text", "form", "text", "form", "text"]
    assert [s["id"] for s in samples] == [s["id"] for s in synth.make_dataset(5, "train", 0, ["text", "form"])]
    assert [s["category"] for s in make_samples("synth", 7, "eval", 0)] == list(synth.CATEGORIES)
    with pytest.raises(DataError, match="unknown or empty synth categories.*txt"):
        make_samples("synth", 2, "train", 0, ["txt"])
    p = tmp_path / "r.yaml"
    p.write_text("train: {max_steps: 2}\n")
    assert load_recipe(p, ["data.categories=[chart]"]).data.categories == ["chart"]
    assert load_recipe(p).data.categories is None
    with pytest.raises(RecipeError, match=r"data.categories: unknown or empty synth categories \['txt'\]; known"):
        load_recipe(p, ["data.categories=[txt]"]).validate()
    with pytest.raises(RecipeError, match="data.categories"):
        load_recipe(p, ["data.categories=[]"]).validate()


def test_connector_starts_at_the_text_embedding_scale():
    """A fresh connector's outputs for unit-scale vision features have the word embeddings' std."""
    from smolvlm.training.build import match_connector_scale

    model = tiny_model()
    with torch.no_grad():
        model.model.text_model.embed_tokens.weight.normal_(0.0, 0.13)
    match_connector_scale(model, 1000)
    proj = model.model.connector.modality_projection.proj
    out = proj(torch.randn(4096, proj.in_features))  # post-layernorm features: unit scale per dim
    assert abs(float(out.std()) - 0.13) < 0.01


def test_recipe_errors_found_before_anything_is_written(ref256, tmp_path):
    """A prefix typo (found only once the model is built) or a missing source is raised before
    ``output_dir`` exists; checkpoints without --resume leave the run's files as they were."""
    out = tmp_path / "run"
    bad = tiny_recipe(ref256, out)
    bad["freeze"]["freeze"] = ["model.txt_model"]
    with pytest.raises(sft.TrainError, match="model.txt_model"):
        run_recipe(recipe_from_dict(bad))
    bad = tiny_recipe(ref256, out)
    bad["optim"]["lr_groups"] = {"model.vision": 1e-3}
    with pytest.raises(sft.TrainError, match="lr_groups"):
        run_recipe(recipe_from_dict(bad))
    with pytest.raises(RecipeError, match="model.checkpoint"):
        run_recipe(recipe_from_dict({"model": {"checkpoint": str(tmp_path / "nope")}, "train": {"output_dir": str(out)}}))
    with pytest.raises(RecipeError, match="model.tokenizer"):
        run_recipe(recipe_from_dict({"model": {"tokenizer": str(tmp_path)}, "train": {"output_dir": str(out)}}))
    assert not out.exists()


def test_autocast_auto_is_bf16_only_with_native_bf16(monkeypatch):
    from smolvlm.training import loop

    monkeypatch.setattr(loop.cpu, "flags", lambda: frozenset({"avx2", "fma"}))
    assert loop.autocast_dtype("auto", "cpu") is None  # an AVX2-only CPU: float32
    monkeypatch.setattr(loop.cpu, "flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}))
    assert loop.autocast_dtype("auto", "cpu") is torch.bfloat16
    assert loop.autocast_dtype("none", "cpu") is None and loop.autocast_dtype("bf16", "cpu") is torch.bfloat16
