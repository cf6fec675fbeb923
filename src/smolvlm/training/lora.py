"""LoRA adapters by module swapping, saved in the PEFT adapter layout.

``inject_lora`` replaces matching ``nn.Linear`` modules of the one model with ``LoRALinear``
(STYLE 3.12: swap modules, never copy model classes). ``LoRALinear`` keeps the base ``weight``
/ ``bias`` as its own (frozen) parameters, so the base keys of the state dict do not change
(``...q_proj.weight``) and the adapter adds ``...q_proj.lora_A.weight`` / ``lora_B.weight``.

Mirrors PEFT's ``LoraLayer``/``Linear`` (peft 0.21): ``y = W x + B(A(dropout(x))) * alpha / r``,
A initialised like ``nn.Linear`` (``kaiming_uniform_(a=sqrt(5))``, PEFT's default
``init_lora_weights=True``) or ``normal(0, 1/r)`` (``"gaussian"``), B zeros, so a fresh adapter is
an exact no-op. Files: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (PEFT drops the adapter name on save).

QLoRA: a target may also be a weight-only quantized ``Int8Linear`` / ``Int4Linear``
(``smolvlm.quantization``). It becomes a ``QLoRALinear``: the quantized layer is kept whole as
``base_layer`` (frozen: its weights are buffers and its bias never trains) and its own forward
(the int kernel where it applies) gives the base output. The int kernels have no backward, so
``FrozenQuantizedMatmul`` supplies the one gradient a frozen base needs, w.r.t. its input:
``grad_x = grad_y @ W_dequant``, with ``W_dequant`` rebuilt per call and dropped right after.
``inject_lora`` routes every quantized layer of the model through it (the non-targets too: the
loss flows back through a quantized ``k_proj`` or ``lm_head`` as well). The adapter file is the
same PEFT layout; ``merge_lora`` folds it into the *dequantized* base (a float ``nn.Linear``) and
``dequantize_base`` turns the remaining quantized layers back into float ones.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smolvlm.quantization import Int4Linear, Int8Linear
from smolvlm.quantization import int4 as _q4
from smolvlm.quantization import int8 as _q8

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_REGEX_CHARS = set("*^$()[]{}?+|\\")


class LoRAError(ValueError):
    """Bad LoRA targets, settings or adapter files."""


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update; the base weight is frozen (PEFT ``lora.Linear``)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming") -> None:
        if r <= 0:
            raise LoRAError(f"LoRA rank r must be positive, got {r}")
        nn.Module.__init__(self)  # adopt the base tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # (out, r)
        self.reset_lora(init)

    def reset_lora(self, init: str = "kaiming") -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise LoRAError(f"unknown LoRA init {init!r}; use 'kaiming' (PEFT default) or 'gaussian'")
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)  # (..., out)
        if self.__dict__.get("adapter_disabled", False):  # ``adapters_disabled``: the base layer alone
            return y
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return y + (delta * self.scaling).to(y.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + B A * scaling`` (computed in float32, cast back)."""
        w = self.weight.data
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.data.copy_((w.float() + delta).to(w.dtype))
        if self.bias is not None:
            lin.bias.data.copy_(self.bias.data)
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.lora_alpha}"


# -- QLoRA: LoRA over a frozen, weight-only quantized base --------------------------------------
QUANTIZED = (Int8Linear, Int4Linear)


# A layer's float weight is rebuilt at most this many float32 bytes at a time (row blocks): the
# text projections of the 256M model fit in one block; its 49280 x 576 lm_head (113 MB as float32)
# takes 14, and dequantizing it whole cost ~350 MB of temporaries (float32 copy + int4 unpacking).
DEQUANT_BLOCK_BYTES = 8 * 2**20


def _row_blocks(layer: nn.Module) -> list[tuple[int, int]]:
    rows = max(16, DEQUANT_BLOCK_BYTES // (4 * layer.in_features))
    return [(r, min(r + rows, layer.out_features)) for r in range(0, layer.out_features, rows)]


def _dequantized_rows(layer: nn.Module, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``r0:r1`` of ``layer.dequantized_weight(dtype)``, bit for bit, (r1 - r0, in): the same float32
    operations as ``dequantize_int8`` / ``dequantize_int4``, done in place in one float32 buffer."""
    if isinstance(layer, Int8Linear):
        w = layer.weight_int8[r0:r1].to(torch.float32).mul_(layer.scale[r0:r1, None].to(torch.float32))
        return w.to(dtype)
    q = _q4.unpack_nibbles(layer.weight_uint4[r0:r1])  # (rows, in) uint8
    s, z = layer.scales[r0:r1, :, None], layer.zeros[r0:r1, :, None]  # (rows, groups, 1)
    w = q.to(torch.float32).view(q.shape[0], s.shape[1], -1).sub_(8.0).mul_(s).add_(z)  # (q - 8) * s + z
    return w.view(q.shape).to(dtype)


def _kernel_applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer.forward(x)`` takes its int CPU kernel (mirrors ``Int8Linear`` / ``Int4Linear``)."""
    if x.device.type != "cpu" or x.numel() > _q8.KERNEL_MAX_ROWS * layer.in_features:
        return False
    if isinstance(layer, Int8Linear):
        return x.dtype in _q8._FAST
    return x.dtype in _q4._FAST and layer.out_features % 16 == 0


def _base_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` (no graph): the layer's own forward when it takes the int CPU kernel; else what it
    would do instead, dequantize then ``linear``, with the weight rebuilt in place (one float buffer,
    not the several temporaries of ``dequantized_weight``) one row block at a time."""
    if _kernel_applies(layer, x):
        return type(layer).forward(layer, x)
    blocks = _row_blocks(layer)
    if len(blocks) == 1:
        y = nn.functional.linear(x, _dequantized_rows(layer, 0, layer.out_features, x.dtype))
    else:
        y = x.new_empty(*x.shape[:-1], layer.out_features)
        for r0, r1 in blocks:
            y[..., r0:r1] = nn.functional.linear(x, _dequantized_rows(layer, r0, r1, x.dtype))
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


class FrozenQuantizedMatmul(torch.autograd.Function):
    """``y = layer(x)`` for a frozen quantized ``layer``, differentiable w.r.t. ``x`` only.

    Forward (``_base_output``): the layer's own forward where it takes the int8/int4 CPU kernel, else
    the dequantize-then-``linear`` it would do (per call, in row blocks of ``DEQUANT_BLOCK_BYTES``),
    run without a graph, so nothing of the weight is kept for backward.
    Backward: ``grad_x = grad_y @ W_dequant`` (``y = x W^T + b``), ``W_dequant`` rebuilt in
    ``grad_y``'s dtype for this call only, in the same row blocks (summed in float32). The layer's
    buffers and bias get no gradient (the int kernels have no derivative to give one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return _base_output(layer, x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        layer, blocks = ctx.layer, _row_blocks(ctx.layer)
        if len(blocks) == 1:
            w = _dequantized_rows(layer, 0, layer.out_features, grad_y.dtype)  # (out, in), this call only
            return torch.matmul(grad_y, w).to(ctx.x_dtype), None
        grad_x = None
        for r0, r1 in blocks:  # grad_y[..., rows] @ W[rows, :], one block of W alive at a time
            part = torch.matmul(grad_y[..., r0:r1], _dequantized_rows(layer, r0, r1, grad_y.dtype)).float()
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.to(ctx.x_dtype), None


def quantized_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A quantized layer's output, through ``FrozenQuantizedMatmul`` when ``x`` needs a gradient
    (and with its weight dequantized in row blocks either way, see ``_base_output``)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return FrozenQuantizedMatmul.apply(x, layer)
    return _base_output(layer, x)


def enable_quantized_backward(model: nn.Module) -> int:
    """Make every ``Int8Linear`` / ``Int4Linear`` of ``model`` differentiable w.r.t. its input
    (``quantized_forward``; an instance-level ``forward``, as ``sft.enable_gradient_checkpointing``
    wraps layers). Returns how many layers it wrapped now (already wrapped ones are skipped)."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, QUANTIZED) and not getattr(mod, "_grad_wrapped", False):
            mod.forward = types.MethodType(quantized_forward, mod)  # a bound method: deepcopy rebinds it
            mod._grad_wrapped = True
            n += 1
    return n


class QLoRALinear(LoRALinear):
    """LoRA over a frozen quantized base: ``y = base_layer(x) + B(A(dropout(x))) * alpha / r``.

    ``base_layer`` is the ``Int8Linear`` / ``Int4Linear`` itself (state-dict keys
    ``...q_proj.base_layer.weight_int8`` etc., as PEFT names wrapped layers); its forward is the
    quantized one (``FrozenQuantizedMatmul``). ``weight`` / ``bias`` are None: there is no float base
    weight. ``lora_A`` / ``lora_B`` are float (``dtype``: the model's float dtype)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                 dtype: torch.dtype = torch.float32) -> None:
        if r <= 0:
            raise LoRAError(f"LoRA rank r must be positive, got {r}")
        if not isinstance(base, QUANTIZED):
            raise LoRAError(f"QLoRALinear wraps Int8Linear/Int4Linear, not {type(base).__name__}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, device=next(base.buffers()).device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)  # (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # (out, r)
        self.reset_lora(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quantized_forward(self.base_layer, x)  # (..., out)
        if self.__dict__.get("adapter_disabled", False):  # ``adapters_disabled``: the base layer alone
            return y
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # (..., out)
        return y + (delta * self.scaling).to(y.dtype)

    def merged_linear(self) -> nn.Linear:
        """A float ``nn.Linear`` (``lora_A``'s dtype) with ``dequant(W) + B A * scaling``, in float32."""
        base, dtype = self.base_layer, self.lora_A.weight.dtype
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
        lin = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=delta.device,
                        dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_((base.dequantized_weight(torch.float32) + delta).to(dtype))
            if base.bias is not None:
                lin.bias.copy_(base.bias)
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.lora_alpha}, quantized base"


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The model's float parameter dtype (what its non-quantized layers hold); float32 if none."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def dequantized_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A frozen float ``nn.Linear`` holding ``layer``'s dequantized weight (and its bias)."""
    w = layer.dequantized_weight(dtype)
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
    lin.requires_grad_(False)
    return lin


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Swap every remaining ``Int8Linear`` / ``Int4Linear`` of ``model`` for a float ``nn.Linear``
    holding its dequantized weight (``dtype``: the model's float dtype by default) and drop the
    model's ``quantization`` record, so ``save_pretrained`` writes a plain float checkpoint. Run
    ``merge_lora`` first (it dequantizes the ``QLoRALinear`` bases). Returns the swapped names."""
    dtype = dtype or _float_dtype(model)
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED)]
    if any(isinstance(m, QLoRALinear) for m in model.modules()):
        raise LoRAError("dequantize_base: merge_lora() first (QLoRALinear layers hold quantized bases)")
    for name in names:
        _set_module(model, name, dequantized_linear(model.get_submodule(name), dtype))
    if names and getattr(model, "quantization", None):
        model.quantization = None
    return names


def _is_regex(t: str) -> bool:
    return any(c in _REGEX_CHARS for c in t)


def target_matches(name: str, targets: list[str]) -> bool:
    """PEFT matching: a plain entry matches the full name or a ``.``-separated suffix;
    an entry with regex characters must ``re.fullmatch`` the full module name."""
    for t in targets:
        if _is_regex(t):
            if re.fullmatch(t, name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(model: nn.Module, targets: list[str], r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                init: str = "kaiming") -> list[str]:
    """Swap every ``nn.Linear`` whose name matches ``targets`` for a ``LoRALinear``, and every
    quantized ``Int8Linear`` / ``Int4Linear`` for a ``QLoRALinear`` (QLoRA; the adapters take the
    model's float dtype). A model holding quantized layers has all of them made differentiable
    w.r.t. their inputs (``enable_quantized_backward``), targets or not.

    Returns the wrapped module names. Raises ``LoRAError`` if nothing matches, if a target matches
    a module that is not a Linear layer (PEFT also refuses those), or if LoRA is already injected.
    """
    if isinstance(targets, str):
        targets = [targets]
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("model already has LoRA layers; merge_lora() or load into a fresh model")
    matched: list[str] = []
    for name, mod in list(model.named_modules()):
        if not name or not target_matches(name, targets):
            continue
        if type(mod) is not nn.Linear and not isinstance(mod, QUANTIZED):
            # Containers whose name happens to match (e.g. a regex hitting ``...mlp``) are skipped
            # only if they hold no parameters of their own; anything else is an error.
            if isinstance(mod, nn.Linear) or list(mod.parameters(recurse=False)):
                raise LoRAError(f"LoRA target {name!r} is a {type(mod).__name__}, only nn.Linear is supported")
            continue
        matched.append(name)
    if not matched:
        raise LoRAError(f"LoRA targets {targets} match no nn.Linear module of {type(model).__name__}")
    float_dtype = _float_dtype(model)
    for name in matched:
        base = model.get_submodule(name)
        _set_module(model, name, QLoRALinear(base, r, alpha, dropout, init, dtype=float_dtype)
                    if isinstance(base, QUANTIZED) else LoRALinear(base, r, alpha, dropout, init))
    enable_quantized_backward(model)
    return matched


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base inside the block: every ``LoRALinear`` computes ``W x + b`` alone
    (PEFT's ``disable_adapter()``), bit-identical to the layer before injection. Restored on exit,
    also on an error; nests."""
    mods = list(lora_modules(model).values())
    before = [m.__dict__.get("adapter_disabled", False) for m in mods]
    for m in mods:
        m.adapter_disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapter_disabled = b


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; the model then holds plain ``nn.Linear`` layers
    again (so ``save_pretrained`` writes the original key set). Returns ``model``. A
    ``QLoRALinear`` merges into its *dequantized* base: a frozen float ``nn.Linear``."""
    for name, mod in lora_modules(model).items():
        lin = mod.merged_linear()
        lin.weight.requires_grad_(mod.weight is not None and mod.weight.requires_grad)
        _set_module(model, name, lin)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's saved names."""
    out = {}
    for name, mod in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_A.weight.detach().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_B.weight.detach().contiguous()
    return out


def _config_targets(names: list[str]) -> list[str]:
    # PEFT stores plain suffixes; the last path component of each wrapped module is enough
    # (and is what PEFT users write: ["q_proj", "v_proj"]) unless it would match more modules.
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def save_lora(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT LoRA layout)."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise LoRAError("model has no LoRA layers to save")
    first = next(iter(mods.values()))
    if any((m.r, m.lora_alpha) != (first.r, first.lora_alpha) for m in mods.values()):
        raise LoRAError("save_lora supports one r/alpha for all layers (PEFT rank_pattern is not written)")
    names = list(mods)
    targets: list[str] | str = _config_targets(names)
    all_linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED))]
    if sorted(n for n in all_linear if target_matches(n, targets)) != sorted(names):
        # The suffixes would over-match: store an exact regex instead (PEFT accepts a str regex).
        targets = "|".join(re.escape(n) for n in sorted(names))
    drop = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": drop,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(lora_state_dict(model), str(d / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return d


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    p = Path(directory) / ADAPTER_CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}")
    cfg = json.loads(p.read_text())
    if cfg.get("peft_type") != "LORA":
        raise LoRAError(f"{p}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' is supported")
    for k in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(k):
            raise LoRAError(f"{p}: {k}=true is not supported")
    return cfg


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject adapters described by ``adapter_config.json`` (if not already there) and load the
    weights strictly: missing or unexpected adapter tensors are one error naming them."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(directory)
    wpath = Path(directory) / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not lora_modules(model):
        inject_lora(model, targets, r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                    dropout=float(cfg.get("lora_dropout") or 0.0))
    sd = load_file(str(wpath))
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise LoRAError(f"adapter {wpath}: {len(missing)} missing: {', '.join(missing[:5])}; "
                        f"{len(unexpected)} unexpected: {', '.join(unexpected[:5])}")
    for name, mod in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            t = sd[f"{PEFT_PREFIX}{name}.{part}.weight"]
            w = getattr(mod, part).weight
            if t.shape != w.shape:
                raise LoRAError(f"adapter {name}.{part}: shape {tuple(t.shape)} != model {tuple(w.shape)}")
            w.data.copy_(t.to(w.dtype))
    return model
