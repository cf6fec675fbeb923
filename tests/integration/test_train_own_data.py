"""`smolvlm train` on a user's JSONL file (configs/finetune-jsonl.yaml on a tiny checkpoint): a bad line
among good ones is reported by name and dropped, training finishes and writes final/; a data path that
does not exist fails before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smolvlm.cli.main import main
from tests.helpers import build_tiny_checkpoint, make_image

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "configs" / "finetune-jsonl.yaml")


@pytest.fixture(scope="module")
def tiny(ref256, tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny256"), ref256)


def overrides(ckpt: Path, data: Path, out: Path) -> list[str]:
    sets = [f"model.checkpoint={ckpt}", f"data.path={data}", "data.image_splitting=false",
            "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "train.checkpoint_every=2",
            "train.progress=false", "train.autocast=none", "train.gradient_checkpointing=false",
            f"train.output_dir={out}"]
    return [x for s in sets for x in ("--set", s)]


def test_train_on_own_jsonl(tiny, tmp_path, capsys):
    (tmp_path / "img").mkdir()
    for i in range(3):
        make_image(40 + 8 * i, 30, i).save(tmp_path / "img" / f"{i}.png")
    lines = [
        {"images": ["img/0.png"], "texts": [{"user": "What colour?", "assistant": "Mostly grey."}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "img/1.png"},
                                                   {"type": "text", "text": "Describe it."}]},
                      {"role": "assistant", "content": "Random noise."}]},
        {"images": ["img/missing.png"], "texts": [{"user": "And this?", "assistant": "Nothing."}]},  # line 3: bad
        {"texts": [{"user": "Say hi.", "assistant": "Hi."}]},
        {"images": ["img/2.png"], "texts": [{"user": "Wide or tall?", "assistant": "Wide."}]},
    ]
    data = tmp_path / "my_dataset.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    assert main(["train", "--recipe", RECIPE, *overrides(tiny, data, out)]) == 0
    cap = capsys.readouterr()
    assert "trained to step 2" in cap.out
    assert f"dropped {data}:3: missing file" in cap.err
    assert f"{data}: kept 4 of 5 samples; dropped 1 (missing file 1)" in cap.err
    assert (out / "final" / "config.json").is_file() and (out / "adapter").is_dir()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_missing_data_path_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    args = overrides(tmp_path / "no-ckpt-needed", tmp_path / "nope.jsonl", out)
    assert main(["train", "--recipe", RECIPE, *args]) == 2
    assert "data path not found" in capsys.readouterr().err and not out.exists()
