"""bf16 GEMMs and convolutions computed in float32 where this CPU has no fast bf16 path (AVX2-only).

oneDNN's bf16 kernels need AVX-512; on an AVX2-only CPU PyTorch falls back to slow bf16 code.
Measured on an AMD EPYC (AVX2 only), 2 threads, torch 2.13: ``F.linear`` of 1024 x 768 by 768 x 3072
takes 161 ms in bf16 against 36 ms with both operands converted to float32 first (conversion
included), and the vision tower's 16x16 patch convolution of one 512 px tile 1,524 ms against 8 ms.
So a bf16 SmolVLM-256M spent 8.7 s per image tile there (prefill: 106 tok/s).

Numerics: a bf16 GEMM multiplies bf16 values, accumulates in float32 and rounds the output to bf16.
Converting bf16 to float32 is exact, so the float32 GEMM of the converted operands computes the same
products with float32 accumulation, then rounds once: the same result up to summation order.

Only calls of at least ``MIN_ROWS`` rows convert: a one-token decode step reads each weight once,
and there a bf16 GEMV is the faster one (1 x 576 by 576 x 1536: 0.08 ms bf16, 0.24 ms converted;
the two cross near 8 rows). Those calls run smolvlm's AVX2 bf16 GEMV (``kernels/bf16_gemv.cpp``: the
same float32 products and accumulation, one stream of weights per thread) where the kernels run, 1.9x
PyTorch's bf16 GEMV over a 256M decode step's layers on an AVX2-only Zen 1 EPYC (bench/ANALYSIS.md, thirteenth
round), else PyTorch's. The weights stay bf16 (no second copy); the state dict is unchanged.

``GemvLinear`` (the same GEMV, bf16 or float32, on text linears left unpacked where it beats the layers'
other GEMV: bf16 only with AVX-512, AMX CPUs included, ``text_gemv_pays``) lives here too.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm import kernels
from smolvlm.model.packed import packing_available, packing_pays, wide_linear

MIN_ROWS = 8
# float32 calls of up to this many rows run ``GemvLinear``'s GEMV, wider ones ``packed.wide_linear``: 80 layers
# of 576x1536 and 1536x576, 2 threads, AMD EPYC Zen 5, ms, against MKL's GEMM (nineteenth round): 8 rows 9.9
# against 21.8, 16 rows 18.3 against 26.8, 24 rows 33.4 against 31.5; against oneDNN's (twenty-second round,
# what wide_linear runs there): 8 rows 10.3 against 12.1, 16 rows 19.0 against 14.2, 24 rows 32.4 against
# 16.4, and as an AVX2-only CPU 16 rows 18.9 against 21.2 packed. 16 is kept for both
F32_GEMV_ROWS = 16


def bf16_is_slow(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 GEMMs on ``device`` take PyTorch's slow path: a CPU whose oneDNN cannot run bf16
    (the probe ``packing_available`` already makes: AVX-512 or AVX-NE-CONVERT needed)."""
    return torch.device(device).type == "cpu" and _cpu_bf16_is_slow()


@functools.lru_cache(maxsize=None)
def _cpu_bf16_is_slow() -> bool:
    return not packing_available(torch.bfloat16, "cpu")


def _wide_bf16(x: torch.Tensor, in_features: int) -> bool:
    """A bf16 call of ``MIN_ROWS`` rows or more: the ones worth converting (module docstring)."""
    return x.dtype == torch.bfloat16 and x.numel() >= MIN_ROWS * in_features


def compute_dtype(x: torch.Tensor, in_features: int) -> torch.dtype:
    """The dtype to run a matrix product of ``x`` in: float32 for a wide bf16 call where bf16 is
    slow (asked per call by the quantized layers' dequantizing prefill path, which the loader does
    not swap), else x's."""
    return torch.float32 if _wide_bf16(x, in_features) and bf16_is_slow(x.device) else x.dtype


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


class UpcastLinear(nn.Linear):
    """``nn.Linear`` whose bf16 calls of ``MIN_ROWS`` rows or more run in float32, and whose narrower
    bf16 calls run smolvlm's bf16 GEMV where it runs (see module docstring)."""

    KERNELS = "gemv"  # the ``kernels.ready`` kind its narrow calls need
    GEMV_DTYPES = (torch.bfloat16,)  # the weight (and activation) dtypes its narrow calls run the GEMV for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _wide_bf16(x, self.in_features):
            return wide_linear(x.float(), self.weight.float(), _f32(self.bias)).to(x.dtype)
        if self._gemv(x):
            return self._run_gemv(x)
        return super().forward(x)

    def _run_gemv(self, x: torch.Tensor) -> torch.Tensor:
        op = torch.ops.smolvlm.bf16_gemv if x.dtype == torch.bfloat16 else torch.ops.smolvlm.f32_gemv
        return op(x.reshape(-1, self.in_features), self.weight).reshape(*x.shape[:-1], self.out_features)

    def _gemv(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs smolvlm's GEMV: a bias-free layer of a ``GEMV_DTYPES`` dtype, a
        narrow call in that dtype (bf16: fewer than ``MIN_ROWS`` rows; float32: ``F32_GEMV_ROWS`` or fewer)
        with no gradient to track (the kernel has no backward), in_features % 8 == 0, the kernels running."""
        rows = F32_GEMV_ROWS + 1 if x.dtype == torch.float32 else MIN_ROWS
        return (x.dtype == self.weight.dtype and x.dtype in self.GEMV_DTYPES
                and x.numel() < rows * self.in_features and self.bias is None and x.device.type == "cpu"
                and self.in_features % 8 == 0 and self.weight.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and kernels.ready(self.KERNELS))

    def decode_weights(self, dtype: torch.dtype, rows: int = 1) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """How ``kernels/decode_layers.cpp`` runs this layer for ``rows`` rows of ``dtype``, as ``forward``
        does (``model.fused_decode``): ("bf16" or "f32", weight, weight), or None where forward would not
        run the GEMV."""
        x = torch.empty(rows, self.in_features, dtype=dtype, device=self.weight.device)
        kind = "bf16" if dtype == torch.bfloat16 else "f32"
        return (kind, self.weight, self.weight) if self._gemv(x) else None

    @staticmethod
    def forward_together(mods: list["UpcastLinear"], x: torch.Tensor) -> torch.Tensor | None:
        """Several layers of the same input x (M, K) (q/k/v, gate/up) in one call of the bf16 GEMV: their
        outputs side by side (M, N_0 + N_1 + ...), the same numbers as one call each
        (``model.packed.fused_outputs``); None where the GEMV would not run them."""
        if any(m.in_features != x.shape[-1] or not m._gemv(x) for m in mods):
            return None
        op = torch.ops.smolvlm.bf16_gemv_cat if x.dtype == torch.bfloat16 else torch.ops.smolvlm.f32_gemv_cat
        return op(x, [m.weight for m in mods])


class GemvLinear(UpcastLinear):
    """A bf16 or float32 text linear left unpacked where smolvlm's GEMV streams it faster than the
    GEMV it would otherwise run (``text_gemv_pays``): narrow calls (decode, bf16 below ``MIN_ROWS`` rows,
    float32 up to ``F32_GEMV_ROWS``) run the kernel on the plain
    weight, alone or q/k/v and gate/up together (``forward_together``); wider calls (prompts, batches)
    ``packed.wide_linear`` in the layer's dtype: oneDNN for bf16 (``F.linear``), and for float32 where
    MKL runs AVX2 code. Same parameters and state dict as ``nn.Linear``."""

    KERNELS = "float_gemv"
    GEMV_DTYPES = (torch.bfloat16, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemv(x):
            return self._run_gemv(x)
        return wide_linear(x, self.weight, self.bias)


def text_gemv_pays(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether a ``dtype`` model's text linears and lm_head stay unpacked as ``GemvLinear`` with
    ``pack="auto"`` (the vision tower is still packed where packing pays), on a CPU where smolvlm's
    GEMV runs (``kernels.ready("float_gemv")``, AMX CPUs included):
    - bf16 where oneDNN has bf16 (AVX-512). Measured on an AMD EPYC, Zen 5 (no AMX, 2 threads): a 256M
      decode step's 121 linears 5.8 ms against 7.4 through oneDNN's packed weights (46.7 against 36.3
      GB/s); decode 73-81 -> 80-107 tokens/s eager, 87-90 -> 95-101 compiled. On a Xeon with AMX
      (``bench/gemv_rows.py``, twenty-fourth round): 30 layers' linears at one row 9.7 against 15.0 ms
      packed, two rows 13.9 against 15.2; 256M decode at a 900-token context 55.2 -> 64.1 tokens/s.
      Prompts pay: without packing there are no fused q/k/v, gate/up or residual post-ops, and a
      900-token 256M prefill took 0.39-0.48 s against 0.34-0.38 (the Xeon: 0.82x the packed speed).
    - float32 wherever the kernel runs. Where packing does not pay (``packed.packing_pays``: AVX-512
      CPUs) those layers were plain ``nn.Linear`` already: only their decode calls change, from
      PyTorch's (MKL's) GEMV to smolvlm's (the Zen 5: 80 layers of 576x1536 and 1536x576, 4.4 against
      14.9 ms, 64 against 19 GB/s; oneDNN's packed float32 GEMV 8.9 ms; eighteenth round). Where it
      pays (AVX2 only) they would be packed: the GEMV beats that too, for 1 to ``F32_GEMV_ROWS`` rows
      (the same 80 layers as an AVX2-only CPU, ``cpu.avx2_only_env``: 1 row 6.9 against 10.0 ms, 8 rows
      10.5 against 16.1, 16 rows 18.9 against 21.2; a 256M decode step at 900 tokens 13.8 against
      18.8 ms, prefill within 10%; twenty-second round). Batches keep them too (``pack_gemv_linears``)."""
    if torch.device(device).type != "cpu" or not kernels.ready("float_gemv"):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and not bf16_is_slow(device))


def gemv_text_linears(model: nn.Module, force: bool = False) -> list[str]:
    """Turn the text decoder's and lm_head's plain bf16 or float32 ``nn.Linear`` into ``GemvLinear`` in place, where
    ``text_gemv_pays`` (``force``: everywhere; tests). Same parameters and state dict; packed, quantized
    and LoRA layers (and those inside them) are left alone. Returns the names changed."""
    modules = dict(model.named_modules())
    done = []
    for name, m in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        if (type(m) is not nn.Linear or m.weight.dtype not in GemvLinear.GEMV_DTYPES or isinstance(parent, nn.Linear)
                or not (name.startswith("model.text_model.") or name == "lm_head")
                or not (force or text_gemv_pays(m.weight.dtype, m.weight.device))):
            continue
        m.__class__ = GemvLinear
        done.append(name)
    return done


def pack_gemv_linears(model: nn.Module) -> list[str]:
    """Pack the bf16 ``GemvLinear`` layers now (``packed.pack_linears``, q/k/v and gate/up fused), for
    batched decoding, where packing pays (bf16: from 2 rows up oneDNN's packed GEMM beats the GEMV,
    SmolVLM-256M on the Zen 5 EPYC: a step of 16 rows 8-14 ms packed against 36-38 as ``GemvLinear``s;
    float32 layers stay ``GemvLinear``). What the server's engine
    and batched evaluation load (``weights.load.pack_for_batches``). Returns the packed names; the plain weights'
    file pages, read while packing, are the caller's to unmap (``memory.drop_file_pages``)."""
    from smolvlm.model.packed import pack_linears

    gemv = [m for m in model.modules() if isinstance(m, GemvLinear)]
    if not gemv or gemv[0].weight.dtype == torch.float32 or not packing_pays(gemv[0].weight.dtype, gemv[0].weight.device):
        # float32: the GEMV stays, 1.5-4x MKL's at 1-16 rows (the Zen 5, 80 layers of 576x1536 and
        # 1536x576; eighteenth and nineteenth rounds, ``F32_GEMV_ROWS``) and ahead of oneDNN's packed
        # GEMV too up to 8 rows there, up to 16 as an AVX2-only CPU (twenty-second round); wider calls run
        # ``packed.wide_linear``: oneDNN on the plain weight where packing float32 pays, as fast as packed
        return []
    for m in gemv:  # plain layers again, which packing replaces
        m.__class__ = nn.Linear
    return pack_linears(model)


class UpcastConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose bf16 calls run in float32 (the patch embedding: one call per batch of tiles)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            return self._conv_forward(x.float(), self.weight.float(), _f32(self.bias)).to(x.dtype)
        return super().forward(x)


UPCAST = {nn.Linear: UpcastLinear, nn.Conv2d: UpcastConv2d}


def upcast_slow_bf16(model: nn.Module, force: bool = False) -> list[str]:
    """Turn the model's plain bf16 ``nn.Linear``/``nn.Conv2d`` into their float32-computing
    subclasses in place, where bf16 is slow on their device (``force``: everywhere; tests). Same
    parameters and state dict; quantized, packed and LoRA layers (and the layers inside them) are left
    alone. Inference-time choice, made by the loader with ``pack`` (``weights/load.py``). Returns the
    names changed."""
    modules = dict(model.named_modules())
    done = []
    for name, m in modules.items():
        new = UPCAST.get(type(m))
        parent = modules.get(name.rpartition(".")[0]) if name else None
        if (new is None or m.weight.dtype != torch.bfloat16 or isinstance(parent, (nn.Linear, nn.Conv2d))
                or not (force or bf16_is_slow(m.weight.device))):
            continue
        m.__class__ = new
        done.append(name)
    return done
