"""`smolvlm train`: the default-model recipe, shrunk with --set overrides, runs 2 steps end to end;
the README's fine-tuning recipe runs from the built-in default model; a recipe that cannot run
fails before it writes anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from smolvlm.cli.main import main
from smolvlm.model.vlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "configs" / "default-model.yaml")
FINETUNE = str(REPO / "configs" / "finetune-lora.yaml")


def tiny_overrides(ref: Path, out: Path) -> list[str]:
    sets = [
        "model.text_backbone=random",
        "model.text={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
        "num_key_value_heads: 2, head_dim: 8, max_position_embeddings: 1024}",
        "model.vision={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
        "image_size: 48, patch_size: 8}",
        "model.scale_factor=3",  # 6x6 patches -> 2x2 = 4 tokens per tile
        "model.processor={do_image_splitting: false, size: {longest_edge: 48}}",
        f"model.tokenizer={ref}",
        "data.n_train=4", "data.n_eval=2",
        "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "train.eval_every=2",
        "train.checkpoint_every=1", "train.progress=false", f"train.output_dir={out}",
        "vision_pretrain.steps=2", "vision_pretrain.batch_size=4",
    ]
    return [x for s in sets for x in ("--set", s)]


def test_train_cli_smoke(ref256, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", RECIPE, *tiny_overrides(ref256, out)]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and "eval_loss" in recs[-1]
    assert all(k in recs[0] for k in ("loss", "lr", "samples_per_s", "elapsed"))
    assert (out / "loss.png").is_file() and (out / "recipe.yaml").is_file()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000001", "step-00000002"]
    model = SmolVLM.from_pretrained(out / "final")
    assert model.config.vision_config.image_size == 48 and model.config.image_seq_len == 4
    # stage 1 ran first and left its weights; stage 2 kept the tower frozen (the recipe freezes it)
    stage1 = out / "vision_pretrain" / "vision.safetensors"
    assert stage1.is_file() and (out / "vision_pretrain" / "summary.json").is_file()
    from safetensors.torch import load_file

    tower = load_file(str(stage1))
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in tower.items() if k.startswith("model.vision_model."))
    stamp = stage1.stat().st_mtime_ns
    # resuming a finished run is a no-op that still succeeds (stage 1 is reloaded, not rerun);
    # without --resume it refuses
    assert main(["train", "--recipe", RECIPE, *tiny_overrides(ref256, out), "--resume"]) == 0
    assert stage1.stat().st_mtime_ns == stamp
    # a resume whose stage-1 settings differ from the finished stage 1 is refused, naming the folder
    assert main(["train", "--recipe", RECIPE, *tiny_overrides(ref256, out), "--resume",
                 "--set", "vision_pretrain.lr=0.5"]) == 2
    assert "vision_pretrain" in capsys.readouterr().err and stage1.stat().st_mtime_ns == stamp
    # without --resume it refuses before writing: the run's recipe.yaml is not overwritten
    saved_recipe = (out / "recipe.yaml").read_text()
    assert main(["train", "--recipe", RECIPE, *tiny_overrides(ref256, out), "--set", "train.max_steps=3"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "recipe.yaml").read_text() == saved_recipe


def test_train_cli_bad_recipe_key_is_one_line_error(tmp_path, capsys):
    assert main(["train", "--recipe", RECIPE, "--set", "train.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.max_stepz" in err and "Traceback" not in err
    assert main(["train", "--recipe", str(tmp_path / "nope.yaml")]) == 2


def test_train_cli_dry_run_prints_resolved_recipe(capsys):
    assert main(["train", "--recipe", RECIPE, "--set", "train.max_steps=10", "--dry-run"]) == 0
    assert "max_steps: 10" in capsys.readouterr().out


def test_finetune_example_runs_from_the_default_model(tmp_path, capsys):
    """The README's `smolvlm train --recipe configs/finetune-lora.yaml`, one step: it starts from the
    built-in default model (model.checkpoint: default), so it runs on a fresh clone."""
    out = tmp_path / "ft"
    sets = ["data.n_train=1", "data.n_eval=0", "train.max_steps=1", "train.batch_size=1", "train.grad_accum=1",
            "schedule.warmup_steps=0", "train.progress=false", f"train.output_dir={out}"]
    assert main(["train", "--recipe", FINETUNE, *(x for s in sets for x in ("--set", s))]) == 0
    assert "trained to step 1" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_config.json").is_file()
    # final/ is a plain checkpoint (LoRA merged): processor files, no default-model manifest
    assert not (out / "final" / "default_model.json").exists()
    model = SmolVLM.from_pretrained(out / "final")
    assert not any(".lora_" in k for k in model.state_dict())
    SmolVLMProcessor.from_pretrained(out / "final")


def test_finetune_example_recipe_values():
    from smolvlm.training.recipe import load_recipe

    r = load_recipe(FINETUNE)
    assert r.model.checkpoint == "default"  # the built-in default model: runs on a fresh clone
    assert r.train.autocast == "auto"  # bf16 only where the CPU/GPU has it natively


def test_missing_checkpoint_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", FINETUNE, "--set", f"model.checkpoint={tmp_path / 'nope'}",
                 "--set", f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "model.checkpoint" in err and "nope" in err and "Traceback" not in err
    assert not out.exists()
