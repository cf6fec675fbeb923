"""The quantized checkpoint format: a ``quantization.json`` next to the usual files.

A folder saved from a quantized model (``save_pretrained`` on a model that ``quantize`` changed)
holds ``config.json`` (+ generation config), ``quantization.json``
(``{"format_version", "mode", "group_size", "modules": [...], "int8_modules": [...]}``; version 2
added ``int8_modules``, the modules of an int4 model kept at int8, its head; version 1 files have
none and still load) and safetensors with the float
tensors plus each quantized module's buffers (``<name>.weight_int8`` + ``<name>.scale``, or
``<name>.weight_uint4`` + ``.scales`` + ``.zeros``). transformers cannot read it; ``from_pretrained``
can, through the one loader (``weights/load.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smolvlm.quantization import QuantizationError, check_mode, quantized_modules

QUANT_FILE = "quantization.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def read_quantization(directory: Path) -> dict[str, Any] | None:
    """The saved quantization of a checkpoint folder (mode, group_size, modules), or None if it has none."""
    path = directory / QUANT_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QuantizationError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(info, dict) or info.get("format_version") not in READABLE_VERSIONS:
        raise QuantizationError(f"{path}: unsupported format_version "
                                f"{info.get('format_version') if isinstance(info, dict) else info!r}")
    mode, group_size, names = str(info.get("mode")), int(info.get("group_size", 32)), info.get("modules")
    int8_names = info.get("int8_modules", [])
    check_mode(mode, group_size)
    for key, value in (("modules", names), ("int8_modules", int8_names)):
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise QuantizationError(f"{path}: '{key}' must be a list of module names")
    if not set(int8_names) <= set(names):
        raise QuantizationError(f"{path}: 'int8_modules' names modules that 'modules' does not")
    return {"mode": mode, "group_size": group_size, "modules": names, "int8_modules": int8_names}


def write_quantization(model: Any, directory: Path) -> str | None:
    """Write ``quantization.json`` for a quantized model; returns its file name, None for a float model."""
    info = getattr(model, "quantization", None)
    if not info or not quantized_modules(model):
        return None
    (directory / QUANT_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **info}, indent=2) + "\n")
    return QUANT_FILE
