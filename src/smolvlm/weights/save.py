"""HF-format checkpoint writer: config.json + safetensors (sharded with an index when large).

The layout is what transformers' ``save_pretrained`` writes (``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``; metadata
``{"format": "pt"}``; a tied ``lm_head.weight`` is left out), so
``AutoModelForImageTextToText.from_pretrained`` loads it back. A quantized model saves the same
way plus a ``quantization.json`` (``weights/quantized.py``); only smolvlm reads that back. Everything is written to a
temporary folder next to the target first and moved in only once complete, so a failed save
never damages an existing checkpoint; other files in the target (tokenizer, processor) are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from smolvlm.hub import DEFAULT_MODEL
from smolvlm.weights import default_model
from smolvlm.weights.load import load_model
from smolvlm.weights.quantized import QUANT_FILE, write_quantization
from smolvlm.weights.safetensors_io import INDEX_NAME, WEIGHTS_NAME

from smolvlm.model.vlm import SmolVLM

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_OUR_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$|^"
                        + re.escape(QUANT_FILE) + "$")


def parse_size(size: int | str) -> int:
    """"5GB" -> 5e9 bytes, "500MiB" -> 500*2^20; ints pass through (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot parse max_shard_size {size!r}; use e.g. '5GB', '500MB' or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def split_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, order-preserving split; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def config_for_save(model: SmolVLM):
    """The model's config with its dtype fields describing the tensors actually written."""
    cfg = model.config
    name = _DTYPE_NAMES.get(model.dtype, str(model.dtype).removeprefix("torch."))
    extra = dict(cfg.extra)
    if "dtype" in extra:  # transformers 5.x spelling; keep it consistent with torch_dtype
        extra["dtype"] = name
    return dataclasses.replace(cfg, torch_dtype=name, extra=extra)


def _write(model: SmolVLM, tmp: Path, max_bytes: int) -> list[str]:
    tied = model.lm_head_is_tied()
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    shards = split_shards(state, max_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(INDEX_NAME)
    config_for_save(model).save(tmp)
    names.append("config.json")
    if model.generation_config is not None:
        (tmp / "generation_config.json").write_text(json.dumps(model.generation_config, indent=2) + "\n")
        names.append("generation_config.json")
    quant = write_quantization(model, tmp)
    if quant:
        names.append(quant)
    return names


def save_pretrained(model: SmolVLM, directory: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` to ``directory`` in HF format; returns the directory."""
    directory = Path(directory).expanduser()
    max_bytes = parse_size(max_shard_size)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
    try:
        names = _write(model, tmp, max_bytes)
        directory.mkdir(exist_ok=True)
        for name in names:
            os.replace(tmp / name, directory / name)  # atomic per file
        # Then drop weight files of an older save with a different layout (e.g. single file -> shards).
        for old in directory.iterdir():
            if _OUR_FILES.match(old.name) and old.name not in names:
                old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def export_default(out_dir: str | Path, directory: str | Path | None = None) -> Path:
    """Write the default model as a standard SmolVLM checkpoint folder (float32 safetensors)."""
    out = Path(out_dir)
    model = load_model(directory if directory is not None else DEFAULT_MODEL, dtype=torch.float32)
    save_pretrained(model, out)  # config.json + weights, atomically
    default_model.copy_folder_files(default_model.assets_dir(directory), out, skip=("config.json",))
    return out
