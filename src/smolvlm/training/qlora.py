"""QLoRA: a target may also be a weight-only quantized ``Int8Linear`` / ``Int4Linear``
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

import types

import torch
from torch import nn

from smolvlm.quantization import Int4Linear, Int8Linear
from smolvlm import quantization
from smolvlm.training.lora_layer import LoRAError, LoRALinear, set_module, target_matches
from smolvlm.training.optim import prefix_match
from smolvlm.training.recipe import Recipe, RecipeError

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
    return layer.dequantized_rows(r0, r1).to(dtype)


def _base_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` (no graph): the layer's own forward when it takes the int CPU kernel; else what it
    would do instead, dequantize then ``linear``, with the weight rebuilt in place (one float buffer,
    not the several temporaries of ``dequantized_weight``) one row block at a time."""
    if layer.kernel_applies(x):
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


def float_dtype(model: nn.Module) -> torch.dtype:
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
    dtype = dtype or float_dtype(model)
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZED)]
    if any(isinstance(m, QLoRALinear) for m in model.modules()):
        raise LoRAError("dequantize_base: merge_lora() first (QLoRALinear layers hold quantized bases)")
    for name in names:
        set_module(model, name, dequantized_linear(model.get_submodule(name), dtype))
    if names and getattr(model, "quantization", None):
        model.quantization = None
    return names


# -- the recipe's model.quantize ------------------------------------------------------------------
def check_recipe(recipe: Recipe) -> None:
    """``model.quantize`` (QLoRA) trains adapters over a frozen quantized base: it needs ``lora.enabled``."""
    if recipe.model.quantize != "none" and not recipe.lora.enabled:
        raise RecipeError(f"model.quantize: {recipe.model.quantize}: QLoRA needs lora.enabled: the quantized base "
                          f"cannot be trained (set lora.enabled: true, or model.quantize: none)")


def quantize_base(model: nn.Module, recipe: Recipe, backbone_vocab: int) -> list[str]:
    """QLoRA (``model.quantize: int8 | int4``): swap the text decoder's linears and lm_head for
    weight-only quantized layers, as ``smolvlm.quantization.quantize`` does for inference, before
    LoRA goes on top (``lora.inject_lora`` wraps quantized targets in ``QLoRALinear``). lm_head stays
    float when tied to the embedding (a quantized copy would add memory, not save it) or when
    ``freeze.train_added_tokens`` trains its new rows. A quantized layer cannot train: one the freeze
    rules would train (and not a LoRA target) is a RecipeError. Returns the quantized names."""
    mr = recipe.model
    if mr.quantize == "none":
        return []
    if quantization.quantized_modules(model):
        raise RecipeError(f"model.quantize: {mr.quantize}: model.checkpoint is already quantized; set model.quantize: "
                          f"none (LoRA trains over its quantized layers as they are)")
    names = quantization.target_linears(model)
    new_rows = recipe.freeze.train_added_tokens and backbone_vocab < model.config.vocab_size
    if "lm_head" in names and (model.lm_head_is_tied() or new_rows):
        names.remove("lm_head")
    targets = [recipe.lora.targets] if isinstance(recipe.lora.targets, str) else list(recipe.lora.targets)
    rules = sorted([(p, False) for p in recipe.freeze.freeze] + [(p, True) for p in recipe.freeze.train],
                   key=lambda r: -len(r[0]))  # sft.apply_freezing's rule: the longest prefix decides
    trained = [n for n in names if not target_matches(n, targets)
               and next((t for pre, t in rules if prefix_match(f"{n}.weight", pre)), True)]
    if trained:
        raise RecipeError(f"model.quantize: {mr.quantize}: the freeze rules would train {len(trained)} layer(s) that "
                          f"QLoRA quantizes (e.g. {trained[0]}), and a quantized weight cannot train; freeze them "
                          f"(e.g. freeze: [model.text_model, lm_head]) or make them lora.targets")
    try:
        quantization.quantize(model, mr.quantize, group_size=mr.quantize_group_size, names=names)
    except quantization.QuantizationError as e:
        raise RecipeError(f"model.quantize: {e}") from None
    return names
