"""`smolvlm tokens`: numbers match SPEC §3.3, JSON output, errors as one line with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from smolvlm.cli.main import COMMANDS, main


@pytest.fixture()
def img640(tmp_path):
    p = tmp_path / "img.png"
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(p)
    return str(p)


def test_registered():
    assert COMMANDS["tokens"][0] == "smolvlm.cli.tokens"


def test_json(ref256, img640, capsys):
    assert main(["tokens", "--model", str(ref256), img640, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    im = r["images"][0]
    assert (im["width"], im["height"], im["rows"], im["cols"], im["tiles"], im["tokens"]) == (640, 480, 3, 4, 13, 862)
    # chat wrapper: "<|im_start|>User:" (3) + image + "<end_of_utterance>\nAssistant:" (5)
    assert r["image_tokens"] == 862 and r["total_tokens"] == 862 + 8


def test_table_prompt_and_no_split(ref2b, img640, capsys):
    assert main(["tokens", "--model", str(ref2b), img640, img640, "--prompt", "Compare.", "--no-split"]) == 0
    out = capsys.readouterr().out
    assert out.count(" 84\n") == 2  # unsplit: S + 3 = 84 tokens each
    assert "image tokens 168" in out and "81 tokens per tile" in out


def test_errors(ref256, tmp_path, capsys):
    assert main(["tokens", "--model", str(ref256), str(tmp_path / "missing.png")]) == 2
    assert "image file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert main(["tokens", "--model", str(ref256), str(bad)]) == 2
    assert "not a recognised image" in capsys.readouterr().err
    assert main(["tokens", "--model", str(tmp_path / "nope"), str(bad)]) == 2
    # No --model: the built-in default model's processor (test_default_model covers it when present).
    assert main(["tokens", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("smolvlm tokens: error:")
