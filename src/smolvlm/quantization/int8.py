"""Weight-only int8: per-output-channel symmetric quantization and ``Int8Linear``.

``w[n, :] ~= weight_int8[n, :] * scale[n]`` with ``scale[n] = max|w[n, :]| / 127`` (no zero point,
as gpt-fast's ``WeightOnlyInt8QuantHandler``). Activations stay in floating point. Decode-sized
calls on CPU read the int8 weights directly (half the bytes of bf16; batch-1 decode time is weight
streaming): smolvlm's own GEMV (``smolvlm.kernels``, any float dtype) where it runs, else
PyTorch's ``_weight_int8pack_mm`` for bf16/fp16. Everything else (prefill, gradients, fp32 without
smolvlm's kernel) dequantizes and calls ``linear``: exact with respect to the quantized weights.
"""

from __future__ import annotations

import torch
from torch import nn

from smolvlm import kernels
from smolvlm.model.packed import wide_linear
from smolvlm.model.upcast import compute_dtype

_FAST = (torch.bfloat16, torch.float16)
# The int8 kernel is a GEMV at heart: at M=1 it beats bf16 ``linear`` ~2x (half the bytes), at
# M=900 (prefill) it is ~4x slower than dequantize + oneDNN GEMM (measured on the 2-core AMD EPYC
# bench machine, 1536x576). Above this many rows we dequantize to the activation dtype instead.
KERNEL_MAX_ROWS = 8
# Rows up to which smolvlm's GEMV runs where PyTorch's runs the rest (AVX-512 CPUs, AMX ones included, kernels
# kind "int8_rows"): a single stream's decode step. Streaming 40 layer pairs (576x1536 + 1536x576,
# 53 MB, past the L3) on an AMD EPYC Zen 5, 2 threads: 1 row 0.039 against PyTorch's 0.055 ms a
# pair, 2 rows 0.045 against 0.055, 4 rows 0.071 against 0.062 (bench/ANALYSIS.md, seventeenth round).
# float32 activations take ours for every row up to KERNEL_MAX_ROWS (PyTorch's takes bf16/fp16 only).
OWN_ROWS = 2
CHUNK_VALUES = 1 << 20  # weights quantized or dequantized at a time: float32 temporaries of 4 MiB


def row_chunks(n: int, k: int) -> list[slice]:
    """Row slices of an (n, k) weight, ``CHUNK_VALUES`` values each (at least one row). At 2.2B the
    whole-weight float32 temporaries of quantizing were 3 x 400 MiB for the head, and 1024-row chunks
    still 0.19 GiB of the load peak at k = 8192."""
    rows = max(1, CHUNK_VALUES // max(k, 1))
    return [slice(r, r + rows) for r in range(0, n, rows)]


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (int8 (N, K), float32 scale (N,)); rows of zeros get scale 1.

    ``row_chunks`` at a time, so the float32 temporaries stay small."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for rows in row_chunks(n, k):
        w = weight[rows].detach().to(torch.float32)
        s = w.abs().amax(dim=1) / 127.0  # (n',)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[rows] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[rows] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int8` in float32, (N, K)."""
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


class Int8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` (same ``in_features``/``out_features``/``bias``) with int8 weights.

    State dict: ``weight_int8`` (N, K) int8, ``scale`` (N,) float32, ``bias`` (N,) if any. A
    non-persistent copy of the scales in the activation dtype feeds the CPU kernel.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._scale_cast: torch.Tensor | None = None  # scale in the last activation dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scale = quantize_int8(linear.weight)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                dtype=linear.weight.dtype, device=linear.weight.device)
        m.weight_int8, m.scale = q, scale
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.scale).to(dtype)

    def _scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        s = self._scale_cast
        if s is None or s.dtype != dtype or s.device != self.scale.device:
            s = self._scale_cast = self.scale.to(dtype)
        return s

    def _f32_scale(self) -> torch.Tensor:
        return self.scale if self.scale.dtype == torch.float32 else self.scale.float()  # after a module .to(dtype)

    def _kernel(self, x: torch.Tensor) -> str | None:
        """The CPU GEMV kernel ``forward(x)`` takes for decode-sized rows: "own" (smolvlm's, any float
        dtype), "torch" (PyTorch's, bf16/fp16), or None (dequantize + ``linear``). The kernels have
        no backward, so an input that needs a gradient here gets None (QLoRA's
        ``FrozenQuantizedMatmul`` calls ``forward`` without grad mode and supplies grad_x itself)."""
        if (x.device.type != "cpu" or x.numel() > KERNEL_MAX_ROWS * self.in_features
                or (x.requires_grad and torch.is_grad_enabled()) or not x.is_floating_point()):
            return None
        if self.in_features % 16 == 0 and (kernels.ready() or (kernels.ready("int8_rows") and (
                x.numel() <= OWN_ROWS * self.in_features or x.dtype == torch.float32))):
            return "own"  # float32: PyTorch has no int8 GEMV for it, and ours beat dequantizing 1.5-4x at 1-8 rows
        return "torch" if x.dtype in _FAST else None

    def kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs a CPU GEMV kernel (else it dequantizes and calls ``linear``)."""
        return self._kernel(x) is not None

    def decode_weights(self, dtype: torch.dtype, rows: int = 1) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """How ``kernels/decode_layers.cpp`` runs this layer for ``rows`` rows of ``dtype``, as ``forward``
        does (``model.fused_decode``): ("int8", weight, float32 scales) for smolvlm's GEMV, ("int8_torch",
        weight, scales in ``dtype``) for PyTorch's, else None (a bias; forward dequantizes)."""
        kernel = self._kernel(torch.empty(rows, self.in_features, dtype=dtype, device=self.scale.device))
        if self.bias is not None or kernel is None:
            return None
        if kernel == "own":
            return "int8", self.weight_int8, self._f32_scale()
        return "int8_torch", self.weight_int8, self._scales_for(dtype)

    @staticmethod
    def forward_together(mods: list["Int8Linear"], x: torch.Tensor) -> torch.Tensor | None:
        """Several bias-free layers of the same input x (M, K) (q/k/v, gate/up) in one call of smolvlm's
        kernel: their outputs side by side (M, N_0 + N_1 + ...), the same numbers as one call each
        (``model.packed.fused_outputs``); None where that kernel would not run them."""
        k = mods[0].in_features
        if any(m.bias is not None or m.in_features != k or m._kernel(x) != "own" for m in mods):
            return None
        return torch.ops.smolvlm.int8_gemv_cat(x, [m.weight_int8 for m in mods], [m._f32_scale() for m in mods])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel(x)
        if kernel == "own":
            # smolvlm's AVX2 GEMV (kernels/int8_gemv.cpp): float32 activations exact, bf16/fp16 ones
            # quantized per 32 (llama.cpp's Q8_0 dot); faster than PyTorch's kernel over a decode
            # step's layers on AVX2-only CPUs (bench/ANALYSIS.md, ninth to eleventh rounds)
            y = torch.ops.smolvlm.int8_gemv(x.reshape(-1, self.in_features), self.weight_int8, self._f32_scale())
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif kernel == "torch":
            x2 = x.reshape(-1, self.in_features)  # (M, K)
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self._scales_for(x.dtype))  # (M, N)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            # The per-row scale commutes with the matmul: (x @ q^T) * s == x @ (q * s)^T.
            # (Prefill-sized inputs land here, compute-bound, the weight cast cheap; so does fp32 decode
            # where smolvlm's kernel is off.)
            # bf16 prefill on a CPU without fast bf16 GEMMs (AVX2-only) runs in float32 (model/upcast.py).
            cd = compute_dtype(x, self.in_features)
            y = (wide_linear(x.to(cd), self.weight_int8.to(cd)) * self._scales_for(cd)).to(x.dtype)  # (packed.wide_linear)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._scale_cast = None  # derived from the buffers being replaced
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
