"""Weight-only int4: group-wise asymmetric quantization and ``Int4Linear``.

Each row is split into groups of ``group_size`` input channels; a group with range
[lo, hi] gets ``scale = (hi - lo) / 15`` and stores ``q = round((w - lo) / scale)`` in 0..15.
Dequantized: ``w ~= (q - 8) * scale + zero`` with ``zero = lo + 8 * scale`` (gpt-fast's
``WeightOnlyInt4QuantHandler`` convention, which is what PyTorch's CPU int4 kernel expects).

Saved layout (independent of the torch version): ``weight_uint4`` (N, K/2) uint8, two values a
byte (low nibble = even input channel), ``scales`` and ``zeros`` (N, K/group_size) float32.
smolvlm's CPU kernel (``smolvlm.kernels``, bf16/fp16 activations) reads that layout as it is;
PyTorch's (float32 activations, or CPUs without smolvlm's kernels) gets its own packed layout
(``_convert_weight_to_int4pack_for_cpu``), derived at load.

Weights that already sit on a grid like this one (a Q4_0/Q4_1/Q4_K GGUF, whose blocks are 32
wide, dequantized) round back onto it exactly. That is lossless for the plain file, but a float
update added afterwards and smaller than half a step (a merged LoRA) is then rounded away
instead of approximated: int4 hands back the model without its fine-tune. ``erased_update``
detects this; ``quantize`` then picks a group size whose grid is not the file's.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from smolvlm import kernels
from smolvlm.model.packed import wide_linear
from smolvlm.model.upcast import compute_dtype
from smolvlm.quantization.int8 import row_chunks  # same chunking

# Above this many input rows the layer dequantizes and calls ``linear`` instead of an int4 kernel,
# whose time grows with the rows. Measured for PyTorch's (bf16, 2 cores, Xeon with AMX), kernel vs
# dequantize + GEMM in ms: 2048x8192 at 32 / 100 / 300 rows 6.6 / 20.6 / 61.9 vs 31.5 / 32.3 / 34.5; 8192x2048
# 6.7 / 20.7 / 59.9 vs 108 / 108 / 113; 576x1536 0.35 / 1.08 / 3.19 vs 1.53 / 1.60 / 1.78. A short
# prompt thus also skips the dequantized copies (~0.2 GiB of temporaries at 2.2B). smolvlm's own kernel
# was no slower than PyTorch's at 1-32 rows on a 2-core AMD EPYC (a SmolLM2-135M step's layers: 0.5x
# the time at 1 row, 0.91-0.98x at 8-32; bench/ANALYSIS.md, twelfth round).
KERNEL_MAX_ROWS = 128

# Activation dtypes for the CPU int4 kernel (torch 2.13 takes both). float32 matters: it is the
# CLI's default, and dequantizing every weight for every decoded token was 4.8 s/token on the
# default model against 1.1 s with the kernel (2-core AMD EPYC, loaded); the kernel's fp32 result
# is the dequantized reference to float32 rounding (~4e-6 on O(1) outputs).
_FAST = (torch.bfloat16, torch.float32)
# Activation dtypes for smolvlm's own int4 kernel (``smolvlm.kernels``, AVX2 CPUs): it quantizes them
# to int8 per 32, which float32 activations are spared (they keep PyTorch's kernel, as int8 keeps
# its exact float path for them).
_OWN = (torch.bfloat16, torch.float16)
GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu takes
# Rounding an ordinary float weight to 16 levels leaves an error spread evenly over +-half a
# step: rms 1/sqrt(12) = 0.29 steps (measured 0.25-0.28 on SmolLM2-135M layers and on Gaussian
# weights). A weight on the grid already rounds back with rms ~0 (the default model's GGUF +
# merged LoRA: 0.012-0.065 steps at group 32, 0.25 at group 64). The threshold sits between.
ON_GRID_RMS_STEPS = 0.15


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) -> (uint8 values 0..15 (N, K), scales (N, K/g), zeros (N, K/g)) in float32.

    Rows are independent, so they are done a ``row_chunks`` at a time: the float32 temporaries stay a
    few MiB instead of several copies of the whole weight (a 2.2B head: 3 x 400 MiB)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs in_features divisible by group_size; got {k} and {group_size}")
    q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, k // group_size, dtype=torch.float32, device=weight.device)
    zeros = torch.empty_like(scales)
    for rows in row_chunks(n, k):
        w = weight[rows].detach().to(torch.float32).reshape(-1, k // group_size, group_size)  # (n', G, g)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (n', G)
        s = ((hi - lo) / 15.0).clamp(min=1e-8)
        q[rows] = torch.round((w - lo[..., None]) / s[..., None]).clamp_(0, 15).reshape(-1, k)
        scales[rows], zeros[rows] = s, lo + 8.0 * s
    return q, scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int4` in float32, (N, K): ``(q - 8) * scale + zero``, in one buffer."""
    n, k = q.shape
    g = k // scales.shape[1]
    return q.to(torch.float32).view(n, -1, g).sub_(8.0).mul_(scales[..., None]).add_(zeros[..., None]).view(n, k)


@torch.no_grad()
def erased_update(weight: torch.Tensor, dequantized: torch.Tensor | Callable[[int, int], torch.Tensor],
                  scales: torch.Tensor) -> float:
    """Relative norm of what int4 rounds away from ``weight`` *because it already sits on this grid*.

    0.0 for an ordinary float weight (rounding error ~uniform, rms >= ``ON_GRID_RMS_STEPS``), and
    for one exactly on the grid up to its own dtype's rounding (a dequantized Q4 GGUF: lossless).
    Otherwise ``|w - w_int4| / |w|``: the weight is a grid plus an off-grid part smaller than half a
    step, and int4 keeps the grid and drops that part (on the default model it keeps ~6% of the
    merged LoRA, int8 keeps ~100%).

    ``dequantized``: the int4 weight (N, K), or ``(start, stop) -> its rows`` so that only
    a ``row_chunks`` is ever in float32 (whole-weight temporaries were 0.3 GiB of the 2.2B load peak).
    """
    rows = dequantized if callable(dequantized) else (lambda a, b: dequantized[a:b])
    n, groups = scales.shape
    eps = torch.finfo(weight.dtype).eps
    steps2 = err2 = w2 = 0.0
    within = True
    for part in row_chunks(n, weight.shape[1]):
        w = weight[part].detach().to(torch.float32)
        err = (w - rows(part.start, part.stop).to(torch.float32)).reshape(w.shape[0], groups, -1)  # (n', G, g)
        step = scales[part].to(torch.float32)[..., None]  # (n', G, 1)
        steps2 += (err / step).pow(2).sum().item()
        err2 += err.pow(2).sum().item()
        w2 += w.pow(2).sum().item()
        if within:
            # What the weight's own dtype explains: its rounding (half an ulp, eps/2 |w|) and the grid
            # rebuilt from rounded ends (each level off by up to eps/2 max|w| of the group); twice that,
            # plus float32 arithmetic slack. bf16: ~0.06-0.12 steps; the default model's update 0.16-0.5.
            a = w.abs().reshape(err.shape)
            within = bool((err.abs() <= eps * (a + a.amax(dim=-1, keepdim=True)) + 1e-5 * step).all())
    if (steps2 / max(weight.numel(), 1)) ** 0.5 >= ON_GRID_RMS_STEPS or within:
        return 0.0
    return err2 ** 0.5 / max(w2 ** 0.5, 1e-30)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, even channel in the low nibble; row-major whatever q's
    strides (a transposed view in gave a transposed result, which the kernels refuse)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (N, K/2) -> (N, K) uint8."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)


def to_kernel_layout(p: torch.Tensor, block: int) -> torch.Tensor:
    """(N, K/2) nibbles (``pack_nibbles``) -> the layout ``_convert_weight_to_int4pack_for_cpu(q, 1)``
    gives (torch 2.13, N a multiple of ``block``): for each block of rows and each input channel k,
    block/2 bytes, byte i = row i (low nibble) | row block/2 + i (high). The same bytes rearranged, so
    the kernel's copy can be the only one. The block is the CPU's: 64 with AVX-512, 32 with AVX2
    (``kernel_block`` finds it at runtime)."""
    n, half = p.shape
    b = unpack_nibbles(p).view(n // block, block, 2 * half).transpose(1, 2)  # (N/block, K, block)
    return (b[..., :block // 2] | (b[..., block // 2:] << 4)).contiguous().view(n, half)


def kernel_layout_values(k: torch.Tensor, block: int) -> torch.Tensor:
    """``to_kernel_layout`` bytes (N, K/2) -> the 4-bit values (N, K) uint8 0..15, row order restored."""
    n, half = k.shape
    b = k.view(n // block, 2 * half, block // 2)  # (N/block, K, block/2)
    return torch.cat((b & 0xF, b >> 4), dim=-1).transpose(1, 2).reshape(n, 2 * half)


def from_kernel_layout(k: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`to_kernel_layout`."""
    return pack_nibbles(kernel_layout_values(k, block))


@functools.lru_cache(maxsize=None)
def kernel_block() -> int | None:
    """The row block of this torch's CPU int4 layout when it is ``to_kernel_layout``'s rule (torch
    picks it by ISA: 64 on AVX-512, 32 on AVX2), else None (then two copies are kept)."""
    q = torch.randint(0, 16, (128, 96), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        want = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    except (RuntimeError, AttributeError):
        return None
    return next((b for b in (64, 32) if torch.equal(want, to_kernel_layout(pack_nibbles(q), b))), None)


class Int4Linear(nn.Module):
    """Drop-in for ``nn.Linear`` with group-wise int4 weights (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ValueError(f"Int4Linear needs in_features ({in_features}) divisible by group_size ({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight_uint4", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._kernel: tuple[str, torch.Tensor, torch.Tensor] | None = None  # (kind, weights, table), derived
        # True once ``weight_uint4`` holds the kernel's own layout (one copy of the weights, not two;
        # state dicts, saving and dequantizing still see ``pack_nibbles`` order: ``nibbles``).
        self._kernel_layout = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        q, scales, zeros = quantize_int4(linear.weight, group_size)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                dtype=linear.weight.dtype, device=linear.weight.device)
        m.weight_uint4, m.scales, m.zeros = pack_nibbles(q), scales, zeros
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def nibbles(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the weights in ``pack_nibbles`` order (N', K/2), whatever layout they are held in."""
        stop = self.out_features if stop is None else stop
        if not self._kernel_layout:
            return self.weight_uint4[start:stop]
        return pack_nibbles(self._values(start, stop))

    def _values(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the 4-bit values, (N', K) uint8 0..15, from either layout."""
        if not self._kernel_layout:
            return unpack_nibbles(self.weight_uint4[start:stop])
        block = kernel_block()
        b0, b1 = start // block * block, -(-stop // block) * block
        return kernel_layout_values(self.weight_uint4[b0:b1], block)[start - b0:stop - b0]

    def dequantized_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``dequantize_int4`` (float32 (N', K), bit for bit), built in one buffer."""
        return dequantize_int4(self._values(start, stop), self.scales[start:stop], self.zeros[start:stop])

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) in ``dtype``, a ``row_chunks`` at a time: the float32 temporaries stay small (a
        prefill dequantizes every layer; whole-weight temporaries left glibc holding ~0.7 GiB at 2.2B)."""
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.scales.device)
        for rows in row_chunks(self.out_features, self.in_features):
            out[rows] = self.dequantized_rows(rows.start, rows.stop)
        return out

    def _kernel_kind(self, dtype: torch.dtype, device: torch.device) -> str | None:
        """The CPU int4 kernel for ``dtype`` activations on ``device``: "own" (smolvlm's: bf16/fp16, a
        group size of ``GROUP_SIZES``, on CPUs where ``smolvlm.kernels`` run), "torch" (PyTorch's:
        bf16/float32, N % 16 == 0, which a 300-token toy vocab does not meet), or None."""
        if device.type != "cpu":
            return None
        if dtype in _OWN and self.group_size in GROUP_SIZES and kernels.ready():
            return "own"
        return "torch" if dtype in _FAST and self.out_features % 16 == 0 else None

    def kernel_supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a CPU int4 kernel can run this layer for ``dtype`` activations on ``device``."""
        return self._kernel_kind(dtype, device) is not None

    def kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs a CPU int4 kernel (else it dequantizes and calls ``linear``)."""
        return self.kernel_supports(x.dtype, x.device) and x.numel() <= KERNEL_MAX_ROWS * self.in_features

    def prepare_kernel(self, dtype: torch.dtype) -> None:
        """Build the CPU kernel's weights for ``dtype`` activations now (else the first kernel call
        does): its weight layout and its scales-and-zeros table.

        That table is then the only copy of the scales and zeros: ``scales`` and ``zeros`` become
        views of it. PyTorch's kernel takes a (G, N, 2) table in ``dtype`` (so a bf16 model's scales
        become bf16: the kernel computes with them in that dtype anyway, and at 2.2B the float32 pair,
        0.37 GiB, does not sit next to the bf16 table, 0.18 GiB) and its own weight layout (derived
        here). smolvlm's takes the saved nibbles as they are and an (N, G, 2) table, bf16 for bf16
        activations, else float32. The dequantizing path (prefill) then uses the kernel's own values;
        saving writes them back as float32."""
        kind = self._kernel_kind(dtype, self.scales.device)
        table_dtype = dtype if kind == "torch" or dtype == torch.bfloat16 else torch.float32
        if self._kernel is not None and self._kernel[0] == kind and self._kernel[2].dtype == table_dtype:
            return
        scales, zeros = self.scales, self.zeros
        if kind == "own":
            if self._kernel_layout:  # PyTorch's layout from an earlier dtype: back to the nibbles
                self.weight_uint4, self._kernel_layout = self.nibbles(), False
            packed = self.weight_uint4
            table = torch.stack((scales, zeros), dim=-1).to(table_dtype)  # (N, G, 2)
            self.scales, self.zeros = table[..., 0], table[..., 1]
        else:
            if self._kernel_layout:
                packed = self.weight_uint4
            elif (block := kernel_block()) and self.out_features % block == 0:
                packed = self.weight_uint4 = to_kernel_layout(self.weight_uint4, block)  # the nibble copy goes
                self._kernel_layout = True
            else:
                packed = torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.weight_uint4).to(torch.int32), 1)
            table = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().to(table_dtype)  # (G, N, 2)
            self.scales, self.zeros = table[..., 0].t(), table[..., 1].t()  # (N, G) views: the one copy
        self._kernel = (kind, packed, table)

    def decode_weights(self, dtype: torch.dtype, rows: int = 1) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """How ``kernels/decode_layers.cpp`` runs this layer for ``rows`` rows of ``dtype``, as ``forward``
        does (``model.fused_decode``): ("int4", weights, table) for smolvlm's kernel, ("int4_torch", ...)
        for PyTorch's (its layout and (G, N, 2) table), or None (no kernel: forward dequantizes)."""
        x = torch.empty(rows, self.in_features, dtype=dtype, device=self.scales.device)
        if self.bias is not None or not self.kernel_applies(x):
            return None
        self.prepare_kernel(dtype)
        kind, packed, table = self._kernel
        return ("int4" if kind == "own" else "int4_torch", packed, table)

    @staticmethod
    def forward_together(mods: list["Int4Linear"], x: torch.Tensor) -> torch.Tensor | None:
        """As ``Int8Linear.forward_together``: bias-free layers of one input x (M, K) in one call of
        smolvlm's kernel, (M, N_0 + N_1 + ...); None where that kernel would not run them."""
        k = mods[0].in_features
        if (any(m.bias is not None or m.in_features != k for m in mods) or x.shape[0] > KERNEL_MAX_ROWS
                or mods[0]._kernel_kind(x.dtype, x.device) != "own"):
            return None
        for m in mods:
            m.prepare_kernel(x.dtype)
        return torch.ops.smolvlm.int4_gemv_cat(x, [m._kernel[1] for m in mods], [m._kernel[2] for m in mods])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_applies(x):
            self.prepare_kernel(x.dtype)
            kind, packed, table = self._kernel
            x2 = x.reshape(-1, self.in_features).contiguous()  # (M, K)
            if kind == "own":  # smolvlm's AVX2 GEMV (kernels/int4_gemv.cpp): llama.cpp's Q4_1 x Q8_1 dot
                y = torch.ops.smolvlm.int4_gemv(x2, packed, table)  # (M, N)
            else:
                y = torch._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, table)  # (M, N)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            cd = compute_dtype(x, self.in_features)  # float32 for a bf16 prefill on AVX2-only CPUs
            y = wide_linear(x.to(cd), self.dequantized_weight(cd)).to(x.dtype)  # float32: oneDNN where MKL is slow
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernel_layout:
            destination[prefix + "weight_uint4"] = self.nibbles()
        for name in ("scales", "zeros"):  # views of the kernel's table once prepared: saved as float32
            if destination[prefix + name].dtype != torch.float32 or not destination[prefix + name].is_contiguous():
                destination[prefix + name] = destination[prefix + name].float().contiguous()

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._kernel, self._kernel_layout = None, False  # derived from the buffers being replaced
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4 group_size={self.group_size}")
