"""`smolvlm generate` / `smolvlm chat` end to end on a tiny random checkpoint built by the test."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smolvlm import SmolVLM, SmolVLMProcessor
from smolvlm.cli.main import main
from smolvlm.generation.generate import generate_ids
from tests.helpers import MAX_POS, build_tiny_checkpoint, make_image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ref256) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cli256"), ref256)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("img") / "a.png"
    make_image(90, 70, 3).save(p)
    return p


def expected_text(ckpt: Path, prompt: str, images: list[Path], n: int) -> str:
    """What the answer must be: greedy ids from the library, decoded (special tokens skipped)."""
    model, proc = SmolVLM.from_pretrained(ckpt).eval(), SmolVLMProcessor.from_pretrained(ckpt)
    content = [{"type": "image", "path": str(p)} for p in images] + [{"type": "text", "text": prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = proc(text=[text], images=[[str(p) for p in images]] if images else None, return_tensors="pt")
    ids = generate_ids(model, **batch, max_new_tokens=n)
    return proc.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generate_streams_answer(ckpt, image, capsys):
    rc = main(["generate", "--model", str(ckpt), "--image", str(image), "--max-new-tokens", "8", "What is this?"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out == expected_text(ckpt, "What is this?", [image], 8).lstrip() + "\n"


@pytest.mark.parametrize("flags", [["--compile"], ["--compile-mode", "max-autotune"]])
def test_generate_compile_gives_the_eager_answer(ckpt, image, capsys, flags):
    """``--compile`` / ``--compile-mode`` decode through generation/compiled.py; the answer is the eager one."""
    rc = main(["generate", "--model", str(ckpt), "--image", str(image), "--max-new-tokens", "8", *flags,
               "What is this?"])
    captured = capsys.readouterr()
    assert rc == 0 and "compiled decode off" not in captured.err, captured.err
    assert captured.out == expected_text(ckpt, "What is this?", [image], 8).lstrip() + "\n"


def test_generate_refuses_an_unknown_compile_mode(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--compile-mode", "fastest", "Hi"])
    assert e.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err


def test_generate_json(ckpt, image, capsys):
    rc = main(["generate", "--model", str(ckpt), "--image", str(image), "--image", str(image), "--json",
               "--max-new-tokens", "6", "--threads", "1", "Compare."])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert set(rec) == {"text", "prompt_tokens", "new_tokens", "time_to_first_token_s", "tokens_per_s", "total_s"}
    assert rec["text"] == expected_text(ckpt, "Compare.", [image, image], 6).lstrip()
    assert rec["new_tokens"] == 6 and rec["prompt_tokens"] > 2 * 16  # two images of >= 1 tile of 16 tokens
    assert rec["total_s"] >= rec["time_to_first_token_s"] > 0 and rec["tokens_per_s"] > 0


def test_generate_sampling_flags_reproducible(ckpt, capsys):
    argv = ["generate", "--model", str(ckpt), "--json", "--max-new-tokens", "6", "--do-sample", "--seed", "3",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.95", "--min-p", "0.01",
            "--repetition-penalty", "1.1", "Hi"]
    assert main(argv) == 0
    a = json.loads(capsys.readouterr().out)["text"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["text"] == a
    assert main(argv[:-1] + ["--no-do-sample", "Hi"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == expected_text(ckpt, "Hi", [], 6).lstrip()


def test_json_text_is_the_streamed_text(ckpt, capsys):
    """One definition of the answer's text: without the leading space the model's first token carries."""
    argv = ["generate", "--model", str(ckpt), "--max-new-tokens", "6", "What is this?"]
    raw = expected_text(ckpt, "What is this?", [], 6)
    assert raw != raw.lstrip()  # the tiny model's answer starts with a space, as real ones do
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert main(argv + ["--json"]) == 0
    assert streamed == json.loads(capsys.readouterr().out)["text"] + "\n" == raw.lstrip() + "\n"


def test_generate_stop_string(ckpt, capsys):
    full = expected_text(ckpt, "Hi", [], 10).lstrip()
    stop = full[4:6]
    assert main(["generate", "--model", str(ckpt), "--json", "--max-new-tokens", "10", "--stop", "zzzz",
                 "--stop", stop, "Hi"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == full[: full.index(stop)]


@pytest.mark.parametrize("argv_tail,message", [
    (["--image", "/nonexistent/x.png", "q"], "image file not found: /nonexistent/x.png"),
    (["--video", "/nonexistent/v.mp4", "q"], "video file not found"),
    (["--max-new-tokens", str(MAX_POS), "q"], f"max_position_embeddings={MAX_POS}"),
    (["--do-sample", "--temperature", "0", "q"], "temperature must be > 0"),
])
def test_generate_errors_are_one_line(ckpt, capsys, argv_tail, message):
    rc = main(["generate", "--model", str(ckpt)] + argv_tail)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_video_on_v1_checkpoint(ckpt, tmp_path, capsys):
    # A SmolVLM v1 (Idefics3) checkpoint has no video_sampling: 1 fps / 64 frames and the SmolVLM2 layout
    # (processor.py docstring); SmolVLM2 video runs are tested in test_cli_video.py.
    from tests._video_fixtures import encode_video

    clip = encode_video(tmp_path / "c.avi", num_frames=35, fps=10, width=24, height=20)  # 3.5 s -> 4 frames
    rc = main(["generate", "--model", str(ckpt), "--video", str(clip), "--json", "--max-new-tokens", "2", "q"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["video_frames"] == 4


def test_missing_model_errors(capsys, tmp_path, monkeypatch):
    from smolvlm import hub

    monkeypatch.setattr(hub, "DEFAULT_MODEL_DIR", tmp_path / "no-default")  # no built-in model shipped
    assert main(["generate", "q"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "q"]) == 2
    assert "nope" in capsys.readouterr().err


def test_chat_keeps_history_and_commands(ckpt, image, capsys, monkeypatch):
    lines = [f"/image {image}", "What is this?", "/image /nonexistent.png", "And the colours?", "/reset",
             "What is this?", "/quit", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    rc = main(["chat", "--model", str(ckpt), "--json", "--max-new-tokens", "5"])
    cap = capsys.readouterr()
    turns = [json.loads(x) for x in cap.out.splitlines()]
    assert rc == 0 and len(turns) == 3
    assert turns[0]["text"] == expected_text(ckpt, "What is this?", [image], 5).lstrip()
    # turn 2 sees turn 1 (image, question, answer) in its prompt; after /reset turn 3 is text-only
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] > turns[2]["prompt_tokens"]
    assert turns[2]["text"] == expected_text(ckpt, "What is this?", [], 5).lstrip()
    assert "image file not found" in cap.err


def test_cli_entry_point_subprocess(ckpt):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "smolvlm.cli.main", "generate", "--model", str(ckpt), "--json",
                        "--max-new-tokens", "3", "--dtype", "bfloat16", "Hi"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["new_tokens"] == 3 and rec["text"]


def test_chat_stream_output_plain(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--model", str(ckpt), "--max-new-tokens", "4"]) == 0  # EOF ends the chat
    assert capsys.readouterr().out == expected_text(ckpt, "Hi", [], 4).lstrip() + "\n"


def test_dtype_auto_is_the_checkpoint_dtype(ckpt, image, tmp_path, capsys):
    """The model commands' default ``--dtype auto`` loads a checkpoint in its stored dtype, as transformers 5
    does (the released SmolVLM checkpoints are bf16, the built-in default model float32); ``--dtype`` overrides."""
    import shutil

    import torch

    from smolvlm.cli.common import DTYPES, load_model_and_processor
    from smolvlm.cli.main import build_parser

    bf16 = tmp_path / "bf16"
    SmolVLM.from_pretrained(ckpt, dtype=torch.bfloat16).save_pretrained(bf16)
    for f in ckpt.iterdir():  # tokenizer, template and processor files
        if f.suffix != ".safetensors" and not (bf16 / f.name).exists():
            shutil.copy(f, bf16 / f.name)
    assert DTYPES[0] == "auto"
    assert build_parser().parse_args(["generate", "Hi"]).dtype == "auto"
    assert load_model_and_processor(str(bf16))[0].dtype == torch.bfloat16
    assert load_model_and_processor(str(ckpt))[0].dtype == torch.float32
    assert load_model_and_processor(str(bf16), "float32")[0].dtype == torch.float32
    rc = main(["generate", "--model", str(bf16), "--image", str(image), "--max-new-tokens", "4", "--json", "What?"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["new_tokens"] >= 1
