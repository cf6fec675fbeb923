"""Strict checkpoint loading: meta-device model, mmap'd safetensors, ``load_state_dict(assign=True)``.

No random weights are ever materialised for ``from_pretrained``: the module tree is built on the
meta device, the safetensors headers are checked against it (all problems reported in one
``CheckpointError``), then each tensor is read (memory-mapped), cast to the requested dtype and
assigned in place of its meta parameter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from smolvlm.config import SmolVLMConfig
from smolvlm.model.layers import RMSNorm
from smolvlm.weights.hub import resolve_checkpoint_dir

if TYPE_CHECKING:
    from smolvlm.model.vlm import SmolVLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Keys some older exports carry that hold no learned state (RoPE tables are recomputed).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the model built from its config."""


def resolve_dtype(dtype: torch.dtype | str | None, config: SmolVLMConfig) -> torch.dtype:
    """None -> float32; "auto" -> the config's ``torch_dtype`` (or 5.x ``dtype``), float32 if absent."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        name = config.torch_dtype or config.extra.get("dtype") or "float32"
    else:
        name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use torch.float32/bfloat16/float16, 'auto' or None")
    return _DTYPES[name]


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the single file, or the shards its index lists."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are not in {directory}: {', '.join(missing)}")
        return files
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Tensor name -> (shape, file), read from the safetensors headers only."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                if key in shapes:
                    raise CheckpointError(f"tensor {key} appears in both {shapes[key][1].name} and {f.name}")
                shapes[key] = (tuple(st.get_slice(key).get_shape()), f)
    return shapes


def expected_shapes(model: nn.Module, optional: set[str]) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer name -> shape for every persistent entry of the model's state dict."""
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items() if k not in optional}


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
               optional: set[str] = frozenset(), where: str = "checkpoint") -> None:
    """Raise one CheckpointError listing every missing, unexpected and wrongly-shaped tensor."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in optional]
    wrong = [f"{k} (checkpoint {list(found[k])} vs model {list(v)})" for k, v in expected.items()
             if k in found and tuple(found[k]) != tuple(v)]
    parts = [f"{len(names)} {label}: {', '.join(names)}"
             for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
    if parts:
        raise CheckpointError(f"{where} does not match the model built from its config.json: " + "; ".join(parts))


def read_generation_config(directory: Path) -> dict[str, Any] | None:
    p = directory / "generation_config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None


def load_pretrained(cls: type["SmolVLM"], path_or_repo_id: str | Path, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu") -> "SmolVLM":
    """Build ``cls`` on meta from config.json, strictly check and assign the safetensors weights."""
    directory = resolve_checkpoint_dir(path_or_repo_id)
    config = SmolVLMConfig.from_json_file(directory / "config.json")
    dtype = resolve_dtype(dtype, config)
    files = weight_files(directory)
    with torch.device("meta"):
        model = cls(config)
    # A tied lm_head is the embedding itself: the checkpoint may omit it (and a stored copy is ignored).
    optional = {"lm_head.weight"} if model.lm_head.weight is model.model.text_model.embed_tokens.weight else set()
    found = checkpoint_shapes(files)
    check_keys(expected_shapes(model, optional), {k: s for k, (s, _) in found.items()}, optional, where=str(directory))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                if key in found and key not in optional:
                    state[key] = st.get_tensor(key).to(device=device, dtype=dtype)
    # strict=False only because a tied lm_head is absent from ``state``; check_keys already ran.
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = sorted(set(missing) - optional) + [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # cannot happen after check_keys; guards against a model/loader mismatch
        raise CheckpointError(f"parameters left uninitialised after loading: {', '.join(still_meta)}")
    model.generation_config = read_generation_config(directory)
    return model.eval()


@torch.no_grad()
def init_random(cls: type["SmolVLM"], config: SmolVLMConfig, dtype: torch.dtype | str | None = None,
                device: torch.device | str = "cpu") -> "SmolVLM":
    """Random model like the reference init: normal(0, initializer_range) weights, zero biases, unit norms.

    Built on meta and materialised once with ``to_empty`` (no double initialisation).
    """
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype).to_empty(device=device)
    vision = model.model.vision_model
    vision_ids = {id(m) for m in vision.modules()}
    for module in model.modules():
        std = config.vision_config.initializer_range if id(module) in vision_ids else config.text_config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    model.tie_weights()
    return model.eval()
