"""The safetensors file format: header parsing, checkpoint folders' weight files, reading tensors.

Exactly one copy of the weights ends up in memory (SmolVLM-256M bf16: 489 MiB):
- same dtype on CPU (the default ``mmap=True``): tensors *alias* a private, copy-on-write
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

import functools
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

WEIGHTS_NAME = "model.safetensors"
# Tensors smaller than this are read, never aliased: touching a few-KiB norm weight through the
# mapping makes the kernel map the file's pages around it too (fault-around, or a whole 2 MiB huge
# page of the page cache), and those pages count as ours. SmolVLM-500M bf16 packed: 47 MiB of the
# packed layers' file bytes stayed resident that way, for 0.2 MiB of norms and biases.
ALIAS_MIN_BYTES = 256 * 1024
INDEX_NAME = "model.safetensors.index.json"
# Keys some older exports carry that hold no learned state (RoPE tables are recomputed).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# safetensors dtype codes (the format spec) -> torch dtypes.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # the safetensors reference implementation refuses larger headers too


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not match the model built from its config."""


def _short(text: str, limit: int = 120) -> str:
    """Header fields come from the file: a corrupt one may be megabytes long."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
    outside the file) is a CheckpointError naming the file and tensor. The result is cached per
    file version (path, size, mtime): the loader reads layer by layer when it packs or quantizes,
    and re-parsing the header each time was a third of a 256M load (0.85 of 2.4 s). Do not mutate it.
    """
    path = Path(path)
    st = path.stat()
    return _parse_header(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _parse_header(name: str, size: int, mtime_ns: int) -> dict[str, TensorInfo]:
    path = Path(name)
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
            raise CheckpointError(f"{path} has a corrupt safetensors header ({_short(str(e))})") from None
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
            raise CheckpointError(f"{path}: tensor {_short(name)} has an unreadable header entry "
                                  f"{_short(repr(entry))}") from None
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0 or base + end > size:
            raise CheckpointError(f"{path}: tensor {_short(name)} {entry['dtype']}{list(shape)} has byte range "
                                  f"[{begin}, {end}) that does not fit its shape or the file ({size} bytes)")
        infos[name] = TensorInfo(dtype, shape, base + begin, base + end)
    return infos


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


def load_safetensors(path: str | Path, keys: set[str] | None = None,
                     dtype: torch.dtype | Callable[[str], torch.dtype] | None = None,
                     device: torch.device | str = "cpu", mmap: bool = True,
                     copy: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (``keys``: a subset), in ``dtype`` on ``device``.

    ``dtype``: one dtype for every floating tensor, a function ``key -> dtype`` (the loader passes
    the dtype of the parameter each tensor replaces), or None (as stored). Integer tensors keep
    their stored dtype unless a function says otherwise.

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
    if callable(dtype):
        target = {k: dtype(k) for k in wanted}
    else:
        target = {k: dtype if dtype is not None and infos[k].dtype.is_floating_point else infos[k].dtype
                  for k in wanted}
    # Aliasing needs the CPU, no conversion and an element-aligned offset (safetensors writers
    # align data, but the format does not promise it), and pays only for large tensors; others take
    # the read path.
    alias = {k for k in wanted if mmap and device.type == "cpu" and target[k] == infos[k].dtype
             and infos[k].start % infos[k].dtype.itemsize == 0 and k not in copy
             and infos[k].end - infos[k].start >= ALIAS_MIN_BYTES}
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
                _read_bytes(f, path, k, i, buf)
                out[k] = buf.view(i.dtype).view(i.shape).to(device=device, dtype=target[k])
                del buf  # the unconverted bytes go now, not at the end of the file
    return {k: out[k] for k in wanted}  # header order


def read_into(path: str | Path, key: str, out: torch.Tensor) -> torch.Tensor:
    """Tensor ``key`` of one safetensors file written into ``out``, a contiguous CPU tensor of its
    shape (converted when the dtypes differ), and returned. With the stored dtype, the bytes go
    straight into ``out``: linears packed as one weight (q/k/v) read their parts side by side into it
    instead of reading each and concatenating them (``model.packed.PackedFused.later_parts``)."""
    path = Path(path)
    info = read_safetensors_header(path)[key]
    if tuple(out.shape) != tuple(info.shape) or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"cannot read {key} {list(info.shape)} into a {list(out.shape)} "
                         f"{'contiguous' if out.is_contiguous() else 'strided'} {out.device.type} tensor")
    if out.dtype != info.dtype:
        return out.copy_(load_safetensors(path, {key}, mmap=False)[key])
    with open(path, "rb") as f:
        _read_bytes(f, path, key, info, out.view(torch.uint8).reshape(-1))
    return out


def _read_bytes(f: Any, path: Path, key: str, info: TensorInfo, buf: torch.Tensor) -> None:
    """Tensor ``key``'s bytes from the open file ``f`` into ``buf`` (uint8, exactly their count)."""
    f.seek(info.start)
    if f.readinto(memoryview(buf.numpy())) != info.end - info.start:
        raise CheckpointError(f"{path} ended while reading tensor {key}")
