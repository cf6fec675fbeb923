"""`smolvlm generate --video` end to end on a tiny random SmolVLM2 checkpoint built by the test.

The checkpoint: ``SmolVLM.from_config`` (model_type "smolvlm", vision 32 px / patch 8, scale 2, so
S = 4 tokens per frame) saved with ``save_pretrained``, plus the SmolVLM2-2.2B tokenizer and chat
template files and a tiny ``preprocessor_config.json`` (M = 32, L = 64, video_sampling fps 1 /
64 frames). The answers are checked against the library path (processor + ``generate_ids``) and the
prompt size against the processor's own expansion, whose parity with transformers 5.23 is
tested in tests/parity/test_processor_video_parity.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._video_fixtures import encode_video, truncate_file

from smolvlm import SmolVLM, SmolVLMProcessor
from smolvlm.cli.main import main
from smolvlm.config import SmolVLMConfig
from smolvlm.generation.generate import generate_ids

REPO = Path(__file__).resolve().parents[2]
S = 4  # (32 // 8 // 2) ** 2 image tokens per frame
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.json")


def build_tiny_smolvlm2(dest: Path, ref2b: Path) -> Path:
    cfg = json.loads((ref2b / "config.json").read_text())
    cfg["scale_factor"] = 2
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8, initializer_range=0.2)
    cfg["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, initializer_range=0.2)
    config = SmolVLMConfig.from_dict(cfg)
    assert config.model_type == "smolvlm" and config.image_seq_len == S
    SmolVLM.from_config(config).save_pretrained(dest)
    for name in TOKENIZER_FILES:
        shutil.copy(ref2b / name, dest / name)
    pre = json.loads((ref2b / "preprocessor_config.json").read_text())
    pre["size"], pre["max_image_size"] = {"longest_edge": 64}, {"longest_edge": 32}
    pre["video_sampling"] = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 32}}
    (dest / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (dest / "processor_config.json").write_text(json.dumps({"image_seq_len": S, "processor_class": "SmolVLMProcessor"}))
    return dest


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, ref2b) -> Path:
    import torch

    torch.manual_seed(0)
    return build_tiny_smolvlm2(tmp_path_factory.mktemp("smolvlm2") / "tiny", ref2b)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    # 93 frames at 10 fps = 9.3 s: SmolVLM2 sampling keeps 9 frames (SPEC 4.1 worked example)
    return encode_video(tmp_path_factory.mktemp("vid") / "clip.mp4", num_frames=93, fps=10, width=40, height=30)


def expected(ckpt: Path, clip: Path, prompt: str, n: int, **sampling) -> tuple[str, int, int]:
    """(answer, prompt tokens, frames) from the library: chat template + processor + greedy generate_ids."""
    model, proc = SmolVLM.from_pretrained(ckpt).eval(), SmolVLMProcessor.from_pretrained(ckpt)
    conv = [{"role": "user", "content": [{"type": "video", "path": str(clip)}, {"type": "text", "text": prompt}]}]
    batch = proc(text=[proc.apply_chat_template(conv)], videos=[[str(clip)]], **sampling)
    ids = generate_ids(model, **batch, max_new_tokens=n)
    assert (batch["input_ids"] == proc.image_token_id).sum() == batch["pixel_values"].shape[1] * S
    answer = proc.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answer, batch["input_ids"].shape[1], batch["pixel_values"].shape[1]


def test_generate_video_json(ckpt, clip, capsys):
    rc = main(["generate", "--model", str(ckpt), "--video", str(clip), "--json", "--max-new-tokens", "5",
               "--threads", "1", "What happens?"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    text, prompt_tokens, frames = expected(ckpt, clip, "What happens?", 5)
    assert rec["video_frames"] == frames == 9
    assert rec["prompt_tokens"] == prompt_tokens > 9 * (S + 3)  # 9 frame blocks + intro + timestamps + question
    assert rec["text"] == text.lstrip() and rec["text"].strip() and rec["new_tokens"] == 5


def test_sampling_flags(ckpt, clip, capsys):
    base = ["generate", "--model", str(ckpt), "--video", str(clip), "--json", "--max-new-tokens", "2", "--threads", "1"]
    assert main(base + ["--max-frames", "3", "q"]) == 0
    capped = json.loads(capsys.readouterr().out)
    assert main(base + ["--fps", "0.5", "q"]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert (capped["video_frames"], slow["video_frames"]) == (3, 5)  # round(0.5 * 9.3) = 5
    _, tokens3, _ = expected(ckpt, clip, "q", 1, max_frames=3)
    _, tokens5, _ = expected(ckpt, clip, "q", 1, fps=0.5)
    assert (capped["prompt_tokens"], slow["prompt_tokens"]) == (tokens3, tokens5)


def test_video_with_image_streams(ckpt, clip, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (50, 20), (200, 30, 90)).save(img)
    rc = main(["generate", "--model", str(ckpt), "--image", str(img), "--video", str(clip), "--max-frames", "2",
               "--max-new-tokens", "4", "Compare them."])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") >= 1


@pytest.mark.parametrize("make_bad,message", [
    (lambda d, clip: truncate_file(clip, d / "cut.mp4", 0.3), "cut.mp4"),
    (lambda d, clip: (d / "text.mp4").write_text("hello") and d / "text.mp4", "cannot open video"),
    (lambda d, clip: d / "missing.mp4", "video file not found"),
])
def test_bad_video_one_line_error(ckpt, clip, tmp_path, capsys, make_bad, message):
    bad = make_bad(tmp_path, clip)
    rc = main(["generate", "--model", str(ckpt), "--video", str(bad), "q"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_flag_errors(ckpt, clip, capsys):
    assert main(["generate", "--model", str(ckpt), "--max-frames", "3", "q"]) == 2
    assert "--fps / --max-frames need --video" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "--video", str(clip), "--max-frames", "0", "q"]) == 2
    assert "max_frames must be a positive integer" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "--video", str(clip), "--fps", "-1", "q"]) == 2
    assert "fps must be a positive number" in capsys.readouterr().err


def test_entry_point_subprocess(ckpt, clip):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, "-m", "smolvlm.cli.main", "generate", "--model", str(ckpt), "--video", str(clip),
                        "--max-frames", "4", "--max-new-tokens", "3", "Describe the video."],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.strip() == expected(ckpt, clip, "Describe the video.", 3, max_frames=4)[0].strip()
