"""DPO (training/dpo.py, data/preference.py): the loss against a hand computation, the reference model
(LoRA adapters disabled / a frozen copy), training moves the margin, bad preference lines, and
``smolvlm train`` with ``train.objective: dpo`` end to end."""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from smolvlm.cli.main import main
from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.data.cauldron import DataError
from smolvlm.data.preference import PreferenceDataWarning, load_preferences, read_preferences
from smolvlm.model.vlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.training import dpo, loop, lora, sft
from smolvlm.training.build import write_processor_files
from smolvlm.training.recipe import ModelRecipe, OptimRecipe, ScheduleRecipe, TrainRecipe
from tests.helpers import TINY_TEXT, TINY_VISION, build_tiny_checkpoint, make_image, tiny_recipe


@pytest.fixture(scope="module")
def processor(ref256, tmp_path_factory) -> SmolVLMProcessor:
    """The published 256M tokenizer/template with 32 px tiles and S = 4 (tiny, fast)."""
    mr = ModelRecipe(tokenizer=str(ref256), processor={"do_image_splitting": False, "size": {"longest_edge": 32}})
    return SmolVLMProcessor.from_pretrained(write_processor_files(mr, 32, 4, tmp_path_factory.mktemp("proc")))


def tiny_model(seed: int = 0) -> SmolVLM:
    cfg = SmolVLMConfig(vision_config=VisionConfig(**TINY_VISION),
                        text_config=TextConfig(vocab_size=49280, pad_token_id=2, **TINY_TEXT),
                        image_token_id=49190, scale_factor=2)
    torch.manual_seed(seed)
    return SmolVLM.from_config(cfg)


SAMPLES = [  # one image, two images (padded to the batch's image count), no image; answers of other lengths
    {"images": [make_image(40, 30, 1)], "prompt": "What colour is the square?", "chosen": "Red.",
     "rejected": "It is a large blue circle on a white background."},
    {"images": [make_image(32, 32, 2), make_image(24, 48, 3)], "prompt": "Compare the two pictures.",
     "chosen": "The first one is brighter than the second.", "rejected": "Same."},
    {"images": [], "prompt": "Say hello.", "chosen": "Hello!", "rejected": "Goodbye, see you never."},
]


def _batch(processor, samples=SAMPLES):
    pairs = [dpo.encode_pair(s, processor) for s in samples]
    return dpo.collate_pairs(pairs, processor.tokenizer.pad_token_id, image_token_id=processor.image_token_id)


def _with_lora(model: SmolVLM, r: int = 4, dropout: float = 0.0) -> SmolVLM:
    lora.inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=r, alpha=8.0, dropout=dropout)
    sft.apply_freezing(model, freeze=["model", "lm_head"])  # only the adapters train
    return model


def hand_logp(model: SmolVLM, enc: dict[str, torch.Tensor]) -> float:
    """log p(response | prompt) of one unpadded encoded sequence: an explicit loop over its target
    tokens, each read from the full logits in float64."""
    kw = {"input_ids": enc["input_ids"][None], "attention_mask": enc["attention_mask"][None]}
    if "pixel_values" in enc:
        kw.update(pixel_values=enc["pixel_values"][None], pixel_attention_mask=enc["pixel_attention_mask"][None])
    with torch.no_grad():
        logits = model(**kw).logits[0].double()  # (T, V)
    labels = enc["labels"].tolist()
    total, n = 0.0, 0
    for t in range(len(labels) - 1):
        if labels[t + 1] == -100:
            continue
        total += float(torch.log_softmax(logits[t], -1)[labels[t + 1]])
        n += 1
    assert n > 0
    return total


def hand_dpo(policy: SmolVLM, reference: SmolVLM, processor, beta: float, ls: float) -> dict[str, float]:
    losses, rc, rr = [], [], []
    for s in SAMPLES:
        enc = dpo.encode_pair(s, processor)
        pc, pr = hand_logp(policy, enc["chosen"]), hand_logp(policy, enc["rejected"])
        qc, qr = hand_logp(reference, enc["chosen"]), hand_logp(reference, enc["rejected"])
        x = (pc - qc) - (pr - qr)
        log_sig = lambda z: -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))  # noqa: E731
        losses.append(-(1 - ls) * log_sig(beta * x) - ls * log_sig(-beta * x))
        rc.append(beta * (pc - qc))
        rr.append(beta * (pr - qr))
    n = len(SAMPLES)
    return {"loss": sum(losses) / n, "rewards/chosen": sum(rc) / n, "rewards/rejected": sum(rr) / n,
            "rewards/margins": (sum(rc) - sum(rr)) / n,
            "rewards/accuracies": sum(a > b for a, b in zip(rc, rr)) / n}


# -- (a) the loss equals a hand computation --------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_loss_matches_hand_computation(processor, kind):
    model = tiny_model().eval()
    with torch.no_grad():  # peaked next-token distributions: a token off by one moves a sum by nats
        model.lm_head.weight.mul_(20)
    base = copy.deepcopy(model)  # the starting model, computed by hand as the reference
    beta, ls = 0.5, 0.1
    if kind == "lora":
        _with_lora(model)
        loss_fn = dpo.DPOLoss(model, beta=beta, label_smoothing=ls)
        assert loss_fn.reference is None  # adapters disabled, no copy
        with torch.no_grad():
            for m in lora.lora_modules(model).values():
                m.lora_B.weight.normal_(0, 0.5)  # the policy moves away from the base
    else:
        loss_fn = dpo.DPOLoss(model, beta=beta, label_smoothing=ls)
        assert loss_fn.reference is not None  # a frozen copy, taken now
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    loss, logs = loss_fn(model, _batch(processor))
    want = hand_dpo(model, base, processor, beta, ls)
    # Both sides run the same float32 model; they differ in batching (a padded 2B-row batch vs one
    # unpadded sequence), the head at target positions only vs full logits, and float32 vs float64
    # log-softmax. Each reassociates float32 sums: ~1e-7 relative on a sequence log-prob of ~-50..-300,
    # i.e. <= ~3e-5 absolute, and beta * 4 of them enter a reward or x (observed: <= ~5e-6). 1e-4
    # absolute covers that; a real error (a token off by one, a padded or prompt token counted, a
    # wrong sign or smoothing term) moves these values by whole nats here (peaked head, beta 0.5).
    # the policy differs from the reference, so every term of the formula counts
    assert abs(want["rewards/chosen"]) > 0.5 and abs(want["rewards/rejected"]) > 0.5
    assert loss.item() == pytest.approx(want["loss"], abs=1e-4)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(logs[k]) == pytest.approx(want[k], abs=1e-4), k
    assert loss_fn.weight(_batch(processor)) == len(SAMPLES)


def test_sequence_logps_head_at_targets_equals_full_logits(processor):
    """The lm_head pre-hook (head at target positions only) gives the full-logits path's numbers."""
    model = tiny_model().eval()
    batch = _batch(processor)
    with torch.no_grad():
        fast = dpo.sequence_logps(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (2B, T, V)
        lp = torch.log_softmax(logits[:, :-1].double(), -1)
        tgt = batch["labels"][:, 1:]
        keep = tgt != -100
        full = (lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * keep).sum(-1)
    torch.testing.assert_close(fast.double(), full, atol=1e-4, rtol=0)  # float32 vs float64 log-softmax, as above


# -- (b) a fresh LoRA (B = 0) is the reference: loss log 2, rewards 0 -------------------------------------
def test_fresh_lora_loss_is_log2(processor):
    model = _with_lora(tiny_model(), dropout=0.2).train()  # dropout on the adapter path: still an exact no-op
    loss_fn = dpo.DPOLoss(model, beta=0.1, label_smoothing=0.0)
    batch = _batch(processor)
    loss, logs = loss_fn(model, batch)
    # policy (train mode, adapters on with B = 0) and reference (eval, adapters off) are bit-identical:
    # W x + b + 0 == W x + b, and nothing else in the model depends on the mode (no other dropout)
    assert torch.equal(dpo.sequence_logps(model, batch), loss_fn.reference_logps(model, batch))
    assert loss.item() == float(torch.tensor(math.log(2), dtype=torch.float32))  # -logsigmoid(0), exactly
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(logs[k]) == 0.0, k
    assert model.training  # the reference pass put the mode back
    loss.backward()  # the adapters get a gradient (through A only while B = 0: dL/dB != 0)
    assert any(m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().sum() > 0
               for m in lora.lora_modules(model).values())


def test_adapters_disabled_is_the_base(processor):
    model = tiny_model().eval()
    base = copy.deepcopy(model)
    _with_lora(model)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.5)
    batch = _batch(processor)
    with torch.no_grad():
        want = dpo.sequence_logps(base, batch)
        with lora.adapters_disabled(model):
            got = dpo.sequence_logps(model, batch)
        after = dpo.sequence_logps(model, batch)
    assert torch.equal(got, want)
    assert not torch.equal(after, want)  # restored on exit


def test_reference_choice_and_sharing():
    model = _with_lora(tiny_model())
    assert dpo.reference_model(model) is None  # adapters only
    sft.apply_freezing(model, freeze=["model.text_model", "lm_head"])  # + vision tower and connector train
    ref = dpo.reference_model(model)
    assert ref is not None and not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    mine, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    for name, p in mine.items():  # frozen tensors are shared, trained ones copied
        assert (theirs[name] is p) == (not p.requires_grad), name


# -- (c) training: the reference stays, the margin grows ---------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_training_moves_margin_not_reference(processor, tmp_path, kind):
    model = tiny_model()
    if kind == "lora":
        _with_lora(model)
        lr = 2e-2
    else:
        sft.enable_gradient_checkpointing(model)  # the frozen copy must not call the policy's wrapped layers
        lr = 2e-3
    model.train()
    pairs = [dpo.encode_pair(s, processor) for s in SAMPLES]
    collate_fn = functools.partial(dpo.collate_pairs, pad_token_id=processor.tokenizer.pad_token_id,
                                   image_token_id=processor.image_token_id)
    batch = collate_fn(pairs)
    loss_fn = dpo.DPOLoss(model, beta=0.1)
    with torch.no_grad():
        policy0 = dpo.sequence_logps(model.eval(), batch)
    ref0 = loss_fn.reference_logps(model, batch)
    assert torch.equal(ref0, policy0)  # the reference is the starting model
    order = sft.DataOrder(len(pairs), 0, shuffle=False)

    def batches(seen: int):
        return [collate_fn([pairs[i] for i in order.indices(seen, 3)])], seen + 3, 3

    cfg = TrainRecipe(output_dir=str(tmp_path / "run"), max_steps=5, batch_size=3, grad_clip=1.0, progress=False)
    loop.run(model, loop.Task(loss_fn, batches), cfg, OptimRecipe(lr=lr), ScheduleRecipe(kind="constant"),
             checkpoints=False)
    with torch.no_grad():
        policy1 = dpo.sequence_logps(model.eval(), batch)
    ref1 = loss_fn.reference_logps(model, batch)
    assert torch.equal(ref1, ref0)  # bit-identical: the reference never trains
    b = len(SAMPLES)
    margin0 = (policy0[:b] - policy0[b:]).mean()  # policy's chosen - rejected log-prob
    margin1 = (policy1[:b] - policy1[b:]).mean()
    assert float(margin1) > float(margin0) + 0.5, (float(margin0), float(margin1))
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1 starts at the reference
    assert rec[-1]["rewards/margins"] > rec[0]["rewards/margins"]
    assert rec[-1]["loss"] < rec[0]["loss"]


# -- (d) bad preference lines -----------------------------------------------------------------------------
def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_bad_lines_are_reported_by_name(tmp_path):
    (tmp_path / "img").mkdir()
    make_image(16, 16, 0).save(tmp_path / "img" / "a.png")
    good = {"images": ["img/a.png"], "prompt": "q", "chosen": "yes", "rejected": "no"}
    f = _write_jsonl(tmp_path / "prefs.jsonl", [
        good,                                                                     # 1
        {"images": ["img/a.png"], "chosen": "yes", "rejected": "no"},             # 2 no prompt
        {**good, "chosen": "  "},                                                 # 3 empty chosen
        {**good, "images": ["img/missing.png"]},                                  # 4 missing image
        "{not json",                                                              # 5
        "",                                                                       # 6 blank: skipped
        {**good, "rejected": "yes"},                                              # 7 identical answers
        {"image": "img/a.png", "prompt": "q", "chosen": "a", "rejected": "b"},    # 8 good (one 'image')
        [1, 2],                                                                   # 9 not an object
    ])
    samples, problems = read_preferences(f)
    assert [s["id"] for s in samples] == ["prefs.jsonl:1", "prefs.jsonl:8"]
    assert samples[0]["images"] == [str(tmp_path / "img" / "a.png")]  # relative to the JSONL file
    expected = {2: "missing key(s) 'prompt'", 3: "empty 'chosen'", 4: "missing image 'img/missing.png'",
                5: "not valid JSON", 7: "same text", 9: "expected a JSON object"}
    assert len(problems) == len(expected)
    for (line, what), msg in zip(expected.items(), problems):
        assert msg.startswith(f"{f}:{line}: "), msg
        assert what in msg, msg
    dropped = r"(?s)dropped 6 bad line\(s\), kept 2.*prefs.jsonl:4: missing image"
    with pytest.warns(PreferenceDataWarning, match=dropped):
        assert len(load_preferences(f)) == 2
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{**good, "chosen": ""}, {**good, "rejected": ""}])
    with pytest.raises(DataError, match=r"(?s)no usable preference pair \(2 bad lines\).*bad.jsonl:1: empty 'chosen'"):
        load_preferences(bad)
    with pytest.raises(DataError, match="the file is empty"):
        load_preferences(_write_jsonl(tmp_path / "empty.jsonl", []))


# -- (e) `smolvlm train` with train.objective: dpo ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(ref256, tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny256"), ref256)


def _dpo_recipe(ref256: Path, ckpt: Path, tmp_path: Path, **data) -> Path:
    r = tiny_recipe(ref256, tmp_path / "out", objective="dpo", max_steps=2, batch_size=2, grad_accum=1,
                    eval_every=2, checkpoint_every=2)
    r["model"] = {"checkpoint": str(ckpt)}
    r["data"] = {"format": "preference", **data}
    r["freeze"] = {"freeze": ["model", "lm_head"]}  # adapters only: the reference is the base
    r["optim"] = {"lr": 1e-3}
    r["lora"]["dropout"] = 0.0
    r["dpo"] = {"beta": 0.1, "label_smoothing": 0.0}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def test_cli_train_dpo_end_to_end(ref256, tiny_ckpt, tmp_path, capsys):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(4):
        make_image(48, 40, i).save(tmp_path / "img" / f"{i}.png")
        lines.append({"images": [f"img/{i}.png"], "prompt": f"Describe picture {i}.",
                      "chosen": f"Picture {i} shows noise.", "rejected": "A dog."})
    train_file = _write_jsonl(tmp_path / "train.jsonl", [*lines, {"prompt": "q", "chosen": "", "rejected": "x"}])
    eval_file = _write_jsonl(tmp_path / "eval.jsonl", lines[:2])
    recipe = _dpo_recipe(ref256, tiny_ckpt, tmp_path, path=str(train_file), eval_path=str(eval_file))
    with pytest.warns(PreferenceDataWarning, match="train.jsonl:5: empty 'chosen'"):
        rc = main(["train", "--recipe", str(recipe)])
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [1, 2]
    assert rec[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter is the reference
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert k in rec[-1] and f"eval_{k}" in rec[-1]
    m = SmolVLM.from_pretrained(out / "final")  # merged, loadable
    assert not any(".lora_" in k for k in m.state_dict())


@pytest.mark.parametrize("data", [{"format": "synth"}, {"format": "jsonl", "path": "x.jsonl"}])
def test_dpo_needs_preference_data(ref256, tiny_ckpt, tmp_path, capsys, data):
    recipe = yaml.safe_load(_dpo_recipe(ref256, tiny_ckpt, tmp_path).read_text())
    recipe["data"] = data
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--recipe", str(tmp_path / "r.yaml")]) == 2
    assert "train.objective: dpo needs data.format: preference" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_preference_data_needs_dpo(ref256, tiny_ckpt, tmp_path, capsys):
    recipe = yaml.safe_load(_dpo_recipe(ref256, tiny_ckpt, tmp_path, path=str(tmp_path / "dpo.yaml")).read_text())
    recipe["train"]["objective"] = "sft"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--recipe", str(tmp_path / "r.yaml")]) == 2
    assert "set train.objective: dpo" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
