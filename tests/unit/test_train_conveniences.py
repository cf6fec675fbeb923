"""Trainer conveniences: `smolvlm train --dry-run` (data summary, parameter counts, memory estimate;
writes nothing), Ctrl-C saves a resumable checkpoint, TensorBoard event files (or a clear error
without the package), the progress bar's postfix and the loss / eval / lr plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from smolvlm.cli.main import main
from smolvlm.training import checkpoint as ckpt
from smolvlm.training import loop
from smolvlm.training.build import build_run, run_recipe
from smolvlm.training.plot import append_metrics, plot_loss
from smolvlm.training.recipe import RecipeError, recipe_from_dict
from tests.helpers import tiny_recipe


def _write_recipe(path: Path, d: dict) -> str:
    path.write_text(yaml.safe_dump(d))
    return str(path)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_dry_run_prints_data_params_memory_and_writes_nothing(ref256, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = _write_recipe(tmp_path / "r.yaml", tiny_recipe(ref256, out))
    assert main(["train", "--recipe", recipe, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no output_dir, nothing else
    assert yaml.safe_load(text.split("data train:")[0])["train"]["output_dir"] == str(out)  # the resolved recipe
    # the data: 5 train / 2 eval synth samples, round-robin over the categories
    train_line = next(x for x in text.splitlines() if x.startswith("data train:"))
    assert train_line.startswith("data train: 5 samples (synth: ")
    assert sum(int(part.split()[-1]) for part in train_line.split("(synth: ")[1].rstrip(")").split(", ")) == 5
    assert "data eval: 2 samples (synth: " in text
    # counts and memory from an independent build of the same recipe
    model = build_run(recipe_from_dict(tiny_recipe(ref256, tmp_path / "other"))).model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert 0 < trainable < frozen
    assert f"parameters: {trainable:,} trainable, {frozen:,} frozen" in text
    mib = 1024 ** 2  # float32: weights 4 B per parameter (+ buffers); grads 4 B and AdamW 8 B per trainable one
    want = (4 * (trainable + frozen) + buffers, 4 * trainable, 8 * trainable)
    assert (f"memory estimate: {sum(want) / mib:.1f} MiB (weights {want[0] / mib:.1f} + grads {want[1] / mib:.1f} "
            f"+ AdamW states {want[2] / mib:.1f}; activations not included)") in text
    assert "steps: 6 x 2 samples" in text


def test_ctrl_c_saves_a_resumable_checkpoint(ref256, tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt in step 2 -> a checkpoint at step 1 (the step in flight is dropped), exit 130
    with the --resume command; resuming ends where an uninterrupted run ends, loss for loss."""
    d = tiny_recipe(ref256, tmp_path / "a", max_steps=4, checkpoint_every=0)
    straight = run_recipe(recipe_from_dict(d))
    d["train"]["output_dir"] = str(tmp_path / "b")
    recipe = _write_recipe(tmp_path / "b.yaml", d)
    real, calls = loop.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted_step)
    assert main(["train", "--recipe", recipe]) == 130
    err = capsys.readouterr().err
    assert "interrupted after step 1" in err and f"smolvlm train --recipe {recipe} --resume" in err
    b = tmp_path / "b"
    assert [p.name for p in ckpt.list_checkpoints(b / "checkpoints")] == ["step-00000001"]
    assert ckpt.read_state(b / "checkpoints" / "step-00000001")["samples_seen"] == 2  # 1 step x 1 x 2 micro
    assert [r["step"] for r in _metrics(b)] == [1] and (b / "loss.png").is_file() and not (b / "final").exists()
    monkeypatch.setattr(loop, "train_step", real)
    assert main(["train", "--recipe", recipe, "--resume"]) == 0
    assert "trained to step 4" in capsys.readouterr().out
    assert [r["loss"] for r in _metrics(b)] == [r["loss"] for r in _metrics(tmp_path / "a")]
    assert straight.step == 4 and (b / "final" / "model.safetensors").is_file()


def test_tensorboard_missing_is_a_clear_error_before_any_write(ref256, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match="pip install tensorboard"):
        run_recipe(recipe_from_dict(tiny_recipe(ref256, out, tensorboard=True)))
    assert not out.exists()


def test_tensorboard_events_and_progress_postfix(ref256, tmp_path, capsys):
    import tensorboard  # noqa: F401  (the test extra installs it: this test never skips)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_recipe(recipe_from_dict(tiny_recipe(ref256, out, max_steps=3, tensorboard=True, progress=True)))
    bar = capsys.readouterr().err
    assert all(k in bar for k in ("loss=", "lr=", "tok/s=")) and "3/3" in bar
    recs = _metrics(out)
    assert all(r["tokens_per_s"] > r["target_tokens_per_s"] > 0 for r in recs)
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= set(tags)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in recs], rel=1e-6)  # stored as float32
    assert [e.step for e in acc.Scalars("eval/loss")] == [3]


def test_loss_plot_has_loss_eval_and_lr_panels(tmp_path):
    m = tmp_path / "metrics.jsonl"
    for step in range(1, 7):
        append_metrics(m, {"step": step, "loss": 3.0 / step, "lr": 1e-3 * step / 6})
    plot_loss(m, tmp_path / "two.png")
    append_metrics(m, {"step": 6, "loss": 0.5, "lr": 1e-3, "eval_loss": 0.7})
    plot_loss(m, tmp_path / "three.png")
    # one 2.2-inch panel (100 dpi) per series: train loss + lr, then train loss + eval loss + lr
    assert Image.open(tmp_path / "two.png").size == (600, 500)
    assert Image.open(tmp_path / "three.png").size == (600, 720)
    assert plot_loss(tmp_path / "none.jsonl", tmp_path / "none.png") is None
