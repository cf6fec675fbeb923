"""The default-model machinery: a run folder -> shipped parts -> GGUF + parts -> a SmolVLM.

Most tests make their own run folder, so that they check the machinery whatever weights ship,
with the architecture of ``configs/default-model.yaml``: the real SmolLM2
GGUF backbone, a freshly initialised vision tower and connector, LoRA with random (non-zero) B,
and perturbed new-token rows, so that every part changes the model's output. Checked: the parts
fit the 25 MB budget with the tokenizer; ``ship-default`` writes exactly those tensors; the
assembled model equals the run's own model (same logits); ``export-default`` writes a folder that
transformers loads and that gives the same greedy tokens (float32, identical tokens required: our
float32 logits match transformers' to ~1e-6, test_model_parity); a wrong GGUF, missing parts or
no default model at all are one clear error. The ``shipped`` tests check the trained parts in the
package itself: budget, manifest, and the export loading in transformers with the same tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from smolvlm import SmolVLM, hub
from smolvlm.cli.main import main
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.training import lora
from smolvlm.training.build import build_model, write_processor_files
from smolvlm.training.recipe import load_recipe
from smolvlm.weights import default_model as dm
from tests.helpers import rss_growth

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "shapes.png"


def _inputs(processor, question, image=None):
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=prompt, images=[image] if image is not None else None, return_tensors="pt")


def _assert_export_answers_alike(export_dir: Path, text_questions: list[str], max_new_tokens: int) -> list[str]:
    """The default model (``hub.DEFAULT_MODEL_DIR``) and transformers on its export give the same greedy
    tokens for the README question about the example image and for ``text_questions``; returns
    our decoded answers, in that order."""
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(export_dir, dtype=torch.float32).eval()
    ours = SmolVLM.from_pretrained("default")
    proc = SmolVLMProcessor.from_pretrained(export_dir)
    answers = []
    for question, image in [("What colour is the triangle?", Image.open(EXAMPLE)), *((q, None) for q in text_questions)]:
        inp = _inputs(proc, question, image)
        n = inp["input_ids"].shape[1]
        mine = ours.generate(**inp, max_new_tokens=max_new_tokens)[0, n:].tolist()
        assert mine == hf.generate(**inp, max_new_tokens=max_new_tokens, do_sample=False)[0, n:].tolist()
        answers.append(proc.decode(mine, skip_special_tokens=True))
    return answers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, the run's model with LoRA merged): what ``smolvlm train`` leaves behind."""
    from smolvlm.processing.tokenizer import Tokenizer

    recipe = load_recipe(REPO / "configs" / "default-model.yaml")
    mr = recipe.model
    mr.tokenizer = str(REPO / mr.tokenizer)  # the recipe's paths are relative to the repo root
    tok = Tokenizer.from_pretrained(mr.tokenizer)
    model, backbone_vocab = build_model(mr, tok.token_to_id("<image>"), len(tok))
    targets = lora.inject_lora(model, recipe.lora.targets, r=recipe.lora.r, alpha=recipe.lora.alpha)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0.0, 0.02)
        for w in (model.model.text_model.embed_tokens.weight, model.lm_head.weight):
            w[backbone_vocab:] += torch.randn_like(w[backbone_vocab:]) * 0.05
            w[backbone_vocab:] = w[backbone_vocab:].bfloat16().float()  # shipped in bf16: make them exact
        for n, p in model.named_parameters():
            if n.startswith(("model.vision_model.", "model.connector.")) or ".lora_" in n:
                p.copy_(p.bfloat16().float())
    d = tmp_path_factory.mktemp("run")
    lora.save_lora(model, d / "adapter", base_model_name_or_path="gguf:smollm2")
    lora.merge_lora(model)
    model.save_pretrained(d / "final")
    proc_dir = write_processor_files(mr, model.config.vision_config.image_size, model.config.image_seq_len, d / "final")
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 0.5, "elapsed": 20.0}) + "\n")
    (d / "recipe.yaml").write_text("train: {batch_size: 8, grad_accum: 1}\n")
    assert targets and proc_dir == d / "final"
    return d, model.eval()


@pytest.fixture(scope="module")
def assets(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("assets")
    assert main(["ship-default", str(run[0]), "--out", str(out)]) == 0
    return out


def test_parts_fit_the_budget_and_match_the_manifest(assets):
    size = sum(f.stat().st_size for f in assets.iterdir() if f.is_file())
    assert size <= 25_000_000, f"default model files are {size / 1e6:.1f} MB, over the 25 MB budget"
    man = dm.read_manifest(assets)
    parts = load_file(str(assets / dm.PARTS_FILE))
    assert {k.rsplit(".lora_", 1)[0] for k in parts if ".lora_" in k} == set(man["lora"]["modules"])
    assert len(man["lora"]["modules"]) == 210  # the 7 projections of 30 layers
    cfg = json.loads((assets / "config.json").read_text())
    new = cfg["text_config"]["vocab_size"] - man["backbone"]["vocab_size"]
    assert parts["new_rows.embed_tokens"].shape == (new, cfg["text_config"]["hidden_size"]) == (128, 576)
    assert all(v.dtype == torch.bfloat16 for v in parts.values())
    assert not any(k.startswith("model.text_model.") and ".lora_" not in k for k in parts)  # the GGUF's own weights
    assert man["trained"] == {"steps": 10, "samples": 80, "wall_time_s": 20.0, "samples_per_s": 4.0, "final_loss": 0.5}


def test_manifest_records_stage_one(run, tmp_path):
    from smolvlm.cli.ship_default import training_facts

    summary = {"steps": 5, "images": 160, "seconds": 9.5, "images_per_s": 16.8, "held_out": {"kind": 0.5}}
    (run[0] / "vision_pretrain").mkdir()
    try:
        (run[0] / "vision_pretrain" / "summary.json").write_text(json.dumps(summary))
        (run[0] / "replay.json").write_text(json.dumps({"settings": {}, "prompts": ["a", "b", "c"],
                                                         "answers": ["x", None, "y"]}))
        facts = training_facts(run[0])
        assert facts["vision_pretrain"] == summary
        assert facts["replay"] == {"prompts": 3, "finished_answers": 2}
    finally:
        shutil.rmtree(run[0] / "vision_pretrain")
        (run[0] / "replay.json").unlink()
    assert "vision_pretrain" not in training_facts(run[0]) and "replay" not in training_facts(run[0])


def test_assembled_model_is_the_run_model(run, assets):
    """GGUF + bf16 parts reproduce the run's model (its trained parts are bf16-exact here, and the
    LoRA is merged in float32 by the same formula, so only summation order could differ)."""
    ours = SmolVLM.from_pretrained(assets)
    proc = SmolVLMProcessor.from_pretrained(assets)
    inp = _inputs(proc, "What colour is the triangle?", Image.open(EXAMPLE))
    with torch.no_grad():
        a, b = ours(**inp).logits, run[1](**inp).logits
    assert (a - b).abs().max() < 1e-4


def test_export_loads_in_transformers_with_the_same_greedy_tokens(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "DEFAULT_MODEL_DIR", assets)  # what the CLI uses without --model
    assert main(["export-default", str(tmp_path / "export")]) == 0
    _assert_export_answers_alike(tmp_path / "export", ["Name a fruit."], max_new_tokens=10)


def test_cli_without_model_uses_the_default(assets, monkeypatch, capsys):
    monkeypatch.setattr(hub, "DEFAULT_MODEL_DIR", assets)
    assert main(["generate", "--image", str(EXAMPLE), "What colour is the triangle?", "--json", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] >= 1 and out["prompt_tokens"] > 36  # one unsplit image: 36 image tokens
    assert main(["tokens", str(EXAMPLE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_seq_len"] == 36


def test_ship_rebuilds_the_same_parts(run, assets, tmp_path):
    again = tmp_path / "again"
    assert main(["ship-default", str(run[0]), "--out", str(again)]) == 0
    a, b = load_file(str(assets / dm.PARTS_FILE)), load_file(str(again / dm.PARTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_parts_and_wrong_backbone_are_clear_errors(assets, tmp_path, monkeypatch, capsys):
    parts_gone = tmp_path / "no-parts"
    shutil.copytree(assets, parts_gone)
    (parts_gone / dm.PARTS_FILE).unlink()
    with pytest.raises(dm.DefaultModelError, match="missing from"):
        SmolVLM.from_pretrained(parts_gone)
    monkeypatch.setattr(hub, "DEFAULT_MODEL_DIR", tmp_path / "nothing")  # a package without the trained parts
    assert main(["generate", "--image", str(EXAMPLE), "What is this?"]) == 2
    err = capsys.readouterr().err
    assert "the default model's files are missing" in err and "Traceback" not in err
    copy = tmp_path / "assets"
    shutil.copytree(assets, copy)
    man = json.loads((copy / dm.MANIFEST_FILE).read_text())
    man["backbone"]["sha256"] = "0" * 64
    (copy / dm.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(dm.DefaultModelError, match="not the GGUF the default model was trained on"):
        SmolVLM.from_pretrained(copy)


# -- the trained default model in the package ----------------------------------------------------
def test_shipped_parts_fit_the_budget_and_record_their_training():
    size = sum(f.stat().st_size for f in hub.DEFAULT_MODEL_DIR.iterdir() if f.is_file())
    assert size <= 25_000_000, f"shipped default model files are {size / 1e6:.1f} MB, over the 25 MB budget"
    man = dm.read_manifest(hub.DEFAULT_MODEL_DIR)
    trained = man["trained"]
    assert trained["steps"] >= 1 and trained["samples"] >= 1 and trained["vision_pretrain"]["images"] >= 1
    recipe = load_recipe(REPO / "configs" / "default-model.yaml")
    assert man["lora"]["r"] == recipe.lora.r and trained["steps"] == recipe.train.max_steps
    assert trained["vision_pretrain"]["steps"] == recipe.vision_pretrain.steps


def test_shipped_export_loads_in_transformers_with_the_same_greedy_tokens(tmp_path):
    assert main(["export-default", str(tmp_path / "export")]) == 0
    answers = _assert_export_answers_alike(tmp_path / "export", ["What is the capital of France?"], max_new_tokens=6)
    assert answers[0].strip() == "orange"


def test_assembling_the_default_model_never_holds_two_copies_of_the_backbone():
    """The default model is built from the dequantized GGUF (float32) plus our parts; each GGUF tensor
    is dropped as its merged copy is made. Peak RSS growth of the assembly, in a child process:
    1.37x the 657 MiB state it returns (the GGUF's mapped pages, the tied head's copy and one
    module's merge on top), against 2.1x when the whole dequantized backbone stayed alive next to
    its merged copy (the README's first command peaked at 1.62 GiB then, 1.10 now). Bound: the
    state + 350 MiB."""
    delta, state = rss_growth("from smolvlm.weights import default_model",
                              "default_model.assemble_state_dict(check_hash=False)",
                              "sum(v.numel() * v.element_size() for v in result.values()) / 2**20")
    assert delta < state + 350, f"assembling grew the RSS by {delta:.0f} MiB for a {state:.0f} MiB state"
