"""Strict checkpoint loading: meta-device model, mmap'd safetensors, ``load_state_dict(assign=True)``.

No random weights are ever materialised for ``from_pretrained``: the module tree is built on the
meta device, the safetensors headers are checked against it (all problems reported in one
``CheckpointError``), then each tensor is assigned in place of its meta parameter.

Exactly one copy of the weights ends up in memory (SmolVLM-256M bf16: 489 MiB):
- same dtype on CPU (the default ``mmap=True``): parameters *alias* a private, copy-on-write
  mapping of the file (``MAP_PRIVATE``, ``UntypedStorage.from_file(shared=False)``). Nothing is
  copied; pages are read on first use and count as file-backed RSS. In-place writes (optimizer
  steps, ``quantize``) stay correct: the kernel gives the written pages a private copy and the
  file is never modified. Caveat: the file must not be rewritten *in place* (truncated and
  rewritten under the same inode) while the model lives; ``save_pretrained`` replaces files
  atomically (new inode), so saving over the folder you loaded from is safe.
- dtype conversion, another device, or ``mmap=False``: each tensor is ``read`` into a fresh buffer
  and converted, so the peak is the converted weights plus one tensor (not plus the whole mapped
  file, which is what a mapping kept open while converting costs).
We parse the safetensors header ourselves (8-byte little-endian length + JSON) instead of using
``safe_open``, so this does not depend on whether a safetensors version copies or maps.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from smolvlm.config import SmolVLMConfig
from smolvlm.model.layers import RMSNorm
from smolvlm.hub import resolve_checkpoint_dir

if TYPE_CHECKING:
    from smolvlm.model.vlm import SmolVLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Keys some older exports carry that hold no learned state (RoPE tables are recomputed).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


# safetensors dtype codes (the format spec) -> torch dtypes.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # the safetensors reference implementation refuses larger headers too


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the model built from its config."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file: absolute byte range [start, end) and layout."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (``u64 LE length`` + JSON ``{name: {dtype, shape, data_offsets}}``).

    Offsets in the file are relative to the end of the header; we return absolute ones. Every
    inconsistency (truncated file, bad JSON, unknown dtype, byte range not matching the shape or
    outside the file) is a CheckpointError naming the file and tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path} is not a safetensors file (header length {n} vs file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object)")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has an unreadable header entry {entry!r}") from None
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0 or base + end > size:
            raise CheckpointError(f"{path}: tensor {name} {entry['dtype']}{list(shape)} has byte range "
                                  f"[{begin}, {end}) that does not fit its shape or the file ({size} bytes)")
        infos[name] = TensorInfo(dtype, shape, base + begin, base + end)
    return infos


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
        for key, info in read_safetensors_header(f).items():
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if key in shapes:
                raise CheckpointError(f"tensor {key} appears in both {shapes[key][1].name} and {f.name}")
            shapes[key] = (info.shape, f)
    return shapes


def load_safetensors(path: str | Path, keys: set[str] | None = None, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu", mmap: bool = True,
                     copy: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (``keys``: a subset), in ``dtype`` (None: as stored) on ``device``.

    ``mmap=True``: tensors already in ``dtype`` on CPU alias a copy-on-write mapping of the file
    (zero copy; see the module docstring). Everything else, and the ``copy`` keys, is read tensor
    by tensor into its own buffer and converted, so at most one unconverted tensor is alive at a
    time. (``copy``: tensors about to be replaced, e.g. packed; aliasing them would leave their
    file pages resident next to the replacement.)
    """
    path = Path(path)
    infos = read_safetensors_header(path)
    device = torch.device(device)
    wanted = [k for k in infos if keys is None or k in keys]
    target = {k: dtype or infos[k].dtype for k in wanted}
    # Aliasing needs the CPU, no conversion and an element-aligned offset (safetensors writers
    # align data, but the format does not promise it); others take the read path.
    alias = {k for k in wanted if mmap and device.type == "cpu" and target[k] == infos[k].dtype
             and infos[k].start % infos[k].dtype.itemsize == 0 and k not in copy}
    out: dict[str, torch.Tensor] = {}
    if alias:
        size = path.stat().st_size
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)  # MAP_PRIVATE
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,), (1,))  # (file bytes,)
        for k in alias:
            i = infos[k]
            out[k] = raw[i.start:i.end].view(i.dtype).view(i.shape)
    rest = [k for k in wanted if k not in alias]
    if rest:
        with open(path, "rb") as f:
            for k in rest:
                i = infos[k]
                # Uninitialised (no zero-fill before the read; ~25% faster than a bytearray) and
                # allocated by torch, so aligned for any element size.
                buf = torch.empty(i.end - i.start, dtype=torch.uint8)
                f.seek(i.start)
                if f.readinto(memoryview(buf.numpy())) != buf.numel():
                    raise CheckpointError(f"{path} ended while reading tensor {k}")
                out[k] = buf.view(i.dtype).view(i.shape).to(device=device, dtype=target[k])
                del buf  # the unconverted bytes go now, not at the end of the file
    return {k: out[k] for k in wanted}  # header order


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
                    device: torch.device | str = "cpu", mmap: bool = True, pack: bool = False) -> "SmolVLM":
    """Build ``cls`` on meta from config.json, strictly check and assign the safetensors weights.

    ``mmap``: alias the file's copy-on-write mapping when no conversion is needed (default; safe
    for training too, see the module docstring); False reads every tensor into private memory.
    ``pack``: inference only, ``model/packed.py`` (no-op where unavailable); the weights it packs
    are read into private memory and freed once packed, never aliased.
    """
    from smolvlm.model.packed import pack_linears, pack_targets, packing_available

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
    pack = pack and packing_available(dtype, device)
    copy = {f"{name}.weight" for name in pack_targets(model)} if pack else set()
    state: dict[str, torch.Tensor] = {}
    for f in files:
        keys = {k for k, (_, src) in found.items() if src == f and k not in optional}
        state.update(load_safetensors(f, keys, dtype=dtype, device=device, mmap=mmap, copy=copy))
    # strict=False only because a tied lm_head is absent from ``state``; check_keys already ran.
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    del state  # the model holds the tensors now; dense copies about to be packed must not outlive the swap
    model.tie_weights()
    still_meta = sorted(set(missing) - optional) + [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # cannot happen after check_keys; guards against a model/loader mismatch
        raise CheckpointError(f"parameters left uninitialised after loading: {', '.join(still_meta)}")
    model.generation_config = read_generation_config(directory)
    if pack:
        pack_linears(model)
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
