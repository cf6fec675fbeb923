"""Every fine-tuning recipe the README shows runs from a fresh clone: one step each, from the built-in
default model, on the example data in ``examples/data`` (written by ``examples/data/make.py``)."""

from __future__ import annotations

import json

import pytest

from smolvlm.cli.main import main
from tests.conftest import REPO

RECIPES = ["finetune-jsonl", "dpo-lora", "qlora", "finetune-cauldron", "finetune-full"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_one_step_from_a_fresh_clone(name, tmp_path, capsys):
    out = tmp_path / name
    sets = ["train.max_steps=1", "train.batch_size=1", "train.grad_accum=1", "schedule.warmup_steps=0",
            "train.progress=false", "train.checkpoint_every=1", f"train.output_dir={out}", "data.limit=2"]
    if name == "qlora":
        sets.remove("data.limit=2")
        sets += ["data.n_train=1", "data.n_eval=0"]
    rc = main(["train", "--recipe", str(REPO / "configs" / f"{name}.yaml"), *(x for s in sets for x in ("--set", s))])
    assert rc == 0, capsys.readouterr().err
    assert "trained to step 1" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_config.json").is_file() == (name != "finetune-full")
    assert (out / "final" / "config.json").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_example_data_is_what_make_py_writes(tmp_path, monkeypatch):
    """The committed example files are reproducible (no hand edits drift from the script)."""
    import importlib.util
    import shutil

    src = REPO / "examples" / "data"
    copy = tmp_path / "data"
    shutil.copytree(src, copy)
    spec = importlib.util.spec_from_file_location("make_examples", copy / "make.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main()
    for f in ("finetune.jsonl", "preferences.jsonl"):
        assert (copy / f).read_text() == (src / f).read_text()
