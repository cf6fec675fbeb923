"""CLI input handling (issue #16): bad flags and files fail in a second, before the model loads, as one
line on stderr with exit code 2; prompts from a file or stdin; the "loading" line on a terminal only;
a closed stdout ends a command quietly (exit 141)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from smolvlm.cli import common
from smolvlm.cli.main import EXIT_BROKEN_PIPE, main
from tests.helpers import build_tiny_checkpoint, make_image

REPO = Path(__file__).resolve().parents[2]


class LoaderCalled(AssertionError):
    pass


@pytest.fixture()
def no_load(monkeypatch) -> list:
    """Any model load fails the test (and records the call): input errors must come first."""
    calls: list = []

    def refuse(*a, **k):
        calls.append((a, k))
        raise LoaderCalled("the model loader was called before the input was checked")

    monkeypatch.setattr(common, "load_model_and_processor", refuse)
    from smolvlm.weights import save

    monkeypatch.setattr(save, "export_default", refuse)
    return calls


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ref256) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cli-inputs") / "tiny", ref256)


def png_header(width: int, height: int) -> bytes:
    """A 65-byte PNG that declares ``width x height`` pixels (a decompression bomb's header: Pillow
    refuses it at open, before decoding anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def bad_images(d: Path) -> dict[str, tuple[str, str]]:
    """name -> (path or URL, what the message must say)."""
    (d / "empty.png").write_bytes(b"")
    (d / "junk.jpg").write_bytes(bytes(range(256)) * 2)
    (d / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>')
    (d / "bomb.png").write_bytes(png_header(30_000, 30_000))
    make_image(40, 30, 0).save(d / "whole.png")
    (d / "cut.png").write_bytes((d / "whole.png").read_bytes()[:200])
    return {
        "empty": (str(d / "empty.png"), "empty.png is empty (0 bytes)"),
        "corrupt": (str(d / "junk.jpg"), "junk.jpg is not a recognised image file"),
        "truncated": (str(d / "cut.png"), "cut.png is corrupt or truncated"),
        "svg": (str(d / "drawing.svg"), "drawing.svg is not a recognised image file"),
        "bomb": (str(d / "bomb.png"), "decompression bomb"),
        "missing": (str(d / "missing.png"), "image file not found"),
        "url": ("https://example.com/a.png", "pass --allow-remote"),
    }


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"smolvlm {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "Error:" not in err, err  # no exception class names
    return err


# -- 1. bad input before the model loads ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["empty", "corrupt", "truncated", "svg", "bomb", "missing", "url"])
def test_generate_bad_image_fails_before_loading(kind, ref256, tmp_path, capsys, no_load):
    src, message = bad_images(tmp_path)[kind]
    assert main(["generate", "--model", str(ref256), "--image", src, "What is this?"]) == 2
    assert message in one_line_error(capsys, "generate")
    assert no_load == []


@pytest.mark.parametrize("flags,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
    (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--do-sample", "--temperature", "0"], "--temperature must be > 0 when sampling"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1], got 1.5"),
    (["--min-p", "-0.1"], "--min-p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0, got 0.0"),
    (["--repetition-penalty", "nan"], "--repetition-penalty must be > 0, got nan"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--quantize-vision"], "--quantize-vision needs --quantize int8 or int4"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_flags_fail_before_loading(command, flags, message, ref256, capsys, no_load, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    tail = ["q"] if command == "generate" else []
    assert main([command, "--model", str(ref256), *flags, *tail]) == 2
    assert message in one_line_error(capsys, command)
    assert no_load == []


@pytest.mark.parametrize("kind", ["empty", "corrupt", "svg", "bomb", "missing", "url"])
def test_chat_bad_image_command_is_reported_without_loading(kind, ref256, tmp_path, capsys, monkeypatch, no_load):
    src, message = bad_images(tmp_path)[kind]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {src}\n/quit\nnever read\n"))
    assert main(["chat", "--model", str(ref256)]) == 0  # the chat goes on; /quit ends it
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert no_load == []


def test_remote_image_allowed_with_the_flag(ref256, tmp_path, capsys, monkeypatch, no_load):
    """--allow-remote: the URL is downloaded and decoded (once) before the model load."""
    import urllib.request

    make_image(40, 30, 1).save(tmp_path / "web.png")
    fetched = []

    def fake_urlopen(url, timeout=None):
        fetched.append(url)
        return io.BytesIO((tmp_path / "web.png").read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(LoaderCalled):  # the input passed; the model load comes next
        main(["generate", "--model", str(ref256), "--allow-remote", "--image", "https://example.com/web.png", "q"])
    assert fetched == ["https://example.com/web.png"] and len(no_load) == 1


def test_export_default_target_checked_before_loading(tmp_path, capsys, no_load):
    (tmp_path / "file").write_text("x")
    assert main(["export-default", str(tmp_path / "file")]) == 2
    assert "file is a file; give a new or existing folder" in one_line_error(capsys, "export-default")
    assert main(["export-default", str(tmp_path / "file" / "sub")]) == 2
    assert "file is a file, not a folder" in one_line_error(capsys, "export-default")
    assert no_load == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to any folder")
def test_export_default_unwritable_folder(tmp_path, capsys, no_load):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["export-default", str(locked / "out")]) == 2
        assert "cannot write to" in one_line_error(capsys, "export-default")
    finally:
        locked.chmod(0o700)
    assert no_load == []


# -- 3. the prompt from a file or stdin -------------------------------------------------------------
def stdin_bytes(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


@pytest.mark.parametrize("setup,argv,message", [
    (None, [], "no prompt: give it as an argument, as - to read stdin, or with --prompt-file PATH"),
    ("p.txt", ["--prompt-file", "{d}/p.txt", "q"], "not both"),
    ("p.txt", ["--prompt-file", "{d}/p.txt", "--prompt", "q"], "not both"),
    (None, ["--prompt", "q", "q"], "give the prompt as an argument or with --prompt, not both"),
    (None, ["--prompt-file", "{d}/none.txt"], "cannot read --prompt-file {d}/none.txt: No such file or directory"),
    (None, ["--prompt-file", "{d}"], "cannot read --prompt-file {d}: Is a directory"),
    ("blank.txt", ["--prompt-file", "{d}/blank.txt"], "--prompt-file {d}/blank.txt is empty"),
    ("latin1.txt", ["--prompt-file", "{d}/latin1.txt"], "--prompt-file {d}/latin1.txt is not UTF-8 text"),
    (None, ["-"], "the prompt on stdin is empty"),
    (None, ["--prompt-file", "-"], "the prompt on stdin is empty"),
])
def test_prompt_source_errors(setup, argv, message, ref256, tmp_path, capsys, monkeypatch, no_load):
    (tmp_path / "p.txt").write_text("a question")
    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9?".encode("latin-1"))
    stdin_bytes(monkeypatch, b"  \n")
    argv = [a.format(d=tmp_path) for a in argv]
    assert main(["generate", "--model", str(ref256), *argv]) == 2
    assert message.format(d=tmp_path) in one_line_error(capsys, "generate")
    assert no_load == []


def test_prompt_from_file_and_stdin_match_the_argument(ckpt, tmp_path, capsys, monkeypatch):
    prompt = "Décris l'image, s'il te plaît.\nEn détail."
    (tmp_path / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    base = ["generate", "--model", str(ckpt), "--json", "--max-new-tokens", "4"]
    assert main(base + [prompt]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(base + ["--prompt-file", str(tmp_path / "prompt.txt")]) == 0
    from_file = json.loads(capsys.readouterr().out)
    stdin_bytes(monkeypatch, (prompt + "\n").encode())
    assert main(base + ["-"]) == 0
    from_stdin = json.loads(capsys.readouterr().out)
    stdin_bytes(monkeypatch, (prompt + "\n").encode())
    assert main(base + ["--prompt-file", "-"]) == 0
    from_stdin_flag = json.loads(capsys.readouterr().out)
    assert main(base + ["--prompt", prompt]) == 0  # as llama.cpp and mlx-vlm take it (not --prompt-file's prefix)
    from_option = json.loads(capsys.readouterr().out)
    for rec in (from_file, from_stdin, from_stdin_flag, from_option):
        assert (rec["text"], rec["prompt_tokens"]) == (want["text"], want["prompt_tokens"])


# -- 2. the loading line, on a terminal only --------------------------------------------------------
class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_loading_line_only_on_a_terminal(ckpt, capsys, monkeypatch):
    argv = ["generate", "--model", str(ckpt), "--max-new-tokens", "3", "Hi"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # piped: nothing on stderr
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(argv) == 0
    assert tty.getvalue() == f"loading {ckpt}...\r\x1b[K"  # shown, then erased when loading ends


def test_loading_line_is_erased_when_loading_fails(capsys, monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["generate", "--model", "/nonexistent/ckpt", "q"]) == 2
    out = tty.getvalue()
    assert out.startswith("loading /nonexistent/ckpt...\r\x1b[K") and "smolvlm generate: error:" in out


# -- 4. a closed stdout ------------------------------------------------------------------------------
def run_with_closed_stdout(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m smolvlm.cli.main ARGS`` with stdout a pipe whose reader is gone before the first
    write (as ``| head -1`` after its line, deterministically)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    try:
        return subprocess.run([sys.executable, "-m", "smolvlm.cli.main", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    finally:
        os.close(write_end)


def test_tokens_into_a_closed_pipe_is_quiet(ref256, tmp_path):
    make_image(64, 48, 0).save(tmp_path / "a.png")
    r = run_with_closed_stdout("tokens", "--model", str(ref256), *[str(tmp_path / "a.png")] * 3)
    assert (r.returncode, r.stderr) == (EXIT_BROKEN_PIPE, "")


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_generate_into_a_closed_pipe_is_quiet(ckpt, json_flag):
    r = run_with_closed_stdout("generate", "--model", str(ckpt), "--max-new-tokens", "4", *json_flag, "Hi")
    assert (r.returncode, r.stderr) == (EXIT_BROKEN_PIPE, "")
