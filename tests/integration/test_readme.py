"""The README is tested: its commands match the CLI table and CI, and its Python example runs."""

from __future__ import annotations

import re
from pathlib import Path

from smolvlm.cli.main import COMMANDS
from tests.conftest import REPO
from tests.helpers import build_tiny_checkpoint

README = (REPO / "README.md").read_text()


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_every_cli_command_is_documented():
    for name in COMMANDS:
        assert f"`smolvlm {name}" in README, f"command {name!r} is missing from the README table"


def test_ci_runs_the_readme_test_command():
    setup = _code_blocks("bash")
    assert len(setup) >= 2, "README must open with the two set-up commands"
    test_cmd = setup[1].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci, "CI must run exactly the README's test command"
    assert "pytest" in test_cmd and "-c constraints.txt" in test_cmd
    assert "-c constraints.txt" in setup[0]
    assert (REPO / "constraints.txt").read_text().split() == ["torch==2.13.0"]


def test_readme_python_example_runs(tmp_path, ref256, capsys):
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", ref256)
    example = (REPO / "examples" / "shapes.png").as_posix()
    code = _code_blocks("python")[0]
    code = code.replace('"HuggingFaceTB/SmolVLM-256M-Instruct"', repr(str(ckpt)))
    code = code.replace('"photo.jpg"', repr(example))
    assert "HuggingFaceTB" not in code and "photo.jpg" not in code
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip(), "the example printed nothing"


def test_readme_main_command_runs(monkeypatch, capsys):
    """The first set-up command ends with the main job, run offline."""
    import shlex

    from smolvlm.cli.main import main

    job = _code_blocks("bash")[0].strip().split("&&")[-1].strip()
    argv = shlex.split(job)
    assert argv[0] == ".venv/bin/smolvlm"
    monkeypatch.chdir(REPO)
    assert argv[1:3] == ["generate", "--image"] and "--model" not in argv  # the shipped default model
    assert main(argv[1:]) == 0
    out = capsys.readouterr().out.strip()
    # the answer the README promises (greedy; " orange" leads " yellow" by 0.9 logits, far above
    # float32 differences between CPUs)
    assert out.lower().strip(" .") == "orange", out
    assert "It answers `orange`" in README
