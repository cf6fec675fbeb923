"""Inference-only ``nn.Linear`` with its weight packed once into oneDNN's blocked layout (CPU).

Why: batch-1 decode is a chain of matrix-vector products, one pass over every weight per token.
On the 2-core AMD EPYC bench machine PyTorch's ``F.linear`` streams a bf16 weight at about
11 GB/s for one row of activations, while the same machine reads memory at about 30 GB/s
(``tensor.sum()``). oneDNN's inner product on a weight reordered ahead of time
(``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, the path PyTorch's own
CPU ``torch.compile`` backend freezes weights into) streams about 21 GB/s. Measured on the 256M
text model, 900-token context: decode 23 -> 34.5 tokens/s, the same greedy tokens (bf16 results
are bit-identical to ``F.linear``; fp32 differs in summation order, ~1e-5 relative).
Vision-sized GEMMs (1024 rows) gain nothing from the layout alone, but a packed weight takes
oneDNN post-ops: ``linear_gelu_tanh`` (fc1 + GELU) and ``linear_add`` (out_proj / fc2 + the
residual) run as one kernel each, so the vision tower is packed too in bf16, where the separate
bf16 GELU and add passes cost a quarter of a tile's time (256M, Xeon AMX, 2 threads: 0.256 ->
0.19 s per 512 px tile). In fp32 the packed GEMMs are slower there (0.82 -> 0.89 s per tile), so
fp32 vision stays plain on Intel CPUs with AVX-512; elsewhere ``F.linear``'s float32 GEMM is MKL's
AVX2 code and the packed one oneDNN's, so fp32 vision is packed too (AMD EPYC Zen 5: 1.13 -> 0.60 s
per tile; ``packing_pays``). The post-ops compute GELU and the add on the fp32 accumulator before
the one rounding to bf16: at least as accurate as the separate passes, not bit-identical.

Contract: a ``PackedLinear`` behaves as the ``nn.Linear`` it replaced for inference, and its state
dict still holds a dense ``weight`` (unpacked on demand), so ``save_pretrained`` keeps working.
It has no trainable weight: reload without packing to train. ``.to(dtype)`` repacks; moving it
off the CPU is an error.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from smolvlm import cpu

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)


def packing_available(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether this PyTorch build *and this CPU* can pack a ``dtype`` weight on ``device`` (CPU +
    oneDNN only). oneDNN's bf16 path needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on an AVX2-only
    CPU it raises, so bf16 models there load unpacked (plain ``nn.Linear``)."""
    return (torch.device(device).type == "cpu" and dtype in PACKABLE_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and _cpu_can_pack(dtype))


def packing_pays(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether packing is available *and faster* here (``pack="auto"``, what the CLI and server use).

    bf16: yes wherever oneDNN packs it (Xeon with AVX-512 BF16/AMX, 256M decode step 33 -> 26.5 ms
    at batch 1, 37 -> 31 ms at batch 8). fp32: where MKL, which ``F.linear`` calls, runs AVX2 code
    (``cpu.mkl_runs_avx512``: not on Intel CPUs with AVX-512). On an Intel Xeon with AVX-512 the packed
    fp32 GEMV is slower than ``F.linear`` (decode step 30 -> 43 ms at batch 1, 53 -> 59 ms at batch 8)
    and so were vision-sized GEMMs (0.82 -> 0.89 s per tile), while on the AVX2-only AMD EPYC it was
    faster (fp32 decode 1.37x -> 1.48x transformers), and on an AMD EPYC Zen 5 (AVX-512, where MKL
    runs AVX2 code) a fp32 vision tile took 1.13 s plain against 0.60 packed (``bench/ANALYSIS.md``,
    twenty-second round). Measured with ``bench/decode_speed.py``-style steps, 2 threads."""
    if not packing_available(dtype, device):
        return False
    return dtype == torch.bfloat16 or not cpu.mkl_runs_avx512()


def wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a call of many rows (a prompt, a batch) on a plain weight: float32 ones through
    oneDNN where its GEMM outruns MKL's (``packing_pays``), with the weight as it is (oneDNN reorders it
    per call, which the rows amortize: 900 rows over a 256M decoder's 80 576x1536 and 1536x576 weights,
    AMD EPYC Zen 5, 278 ms against MKL's 604 and 281 packed; as an AVX2-only CPU 6.5 against 7.4 ms for
    one 900 x 576 by 576 x 1536). The same products as ``F.linear``, summed in another order. Inference
    only (oneDNN's op has no gradient), and not inside a ``torch.compile`` trace."""
    if (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and _f32_onednn_pays()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=None)
def _f32_onednn_pays() -> bool:
    return packing_pays(torch.float32, "cpu")


@functools.lru_cache(maxsize=None)
def _cpu_can_pack(dtype: torch.dtype) -> bool:
    """Pack and run one tiny weight: the only sure test of what this CPU's oneDNN accepts."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype), 1)
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=dtype), w, None, "none", [], "")
    except RuntimeError:
        return False
    return True


# Under torch.compile (``generation/compiled.py``) the packed GEMMs go through these two opaque
# ops: Inductor's own lowering of oneDNN's linear asserts on a weight that is not a frozen
# constant, and ``_linear_pointwise.binary`` has no fake kernel to trace with. They are defined
# with the low-level ``torch.library.Library`` rather than ``@custom_op``: the compiled graph
# calls each ~120 times per token, and custom_op's wrappers cost 12 us a call against 3.6 here
# (a 64x64 bf16 GEMV, Xeon AMX: oneDNN direct 19 us, through this op 22.6, through custom_op 31).
# Eager calls oneDNN directly. Inference only: there is no autograd formula.
_LIB = torch.library.Library("smolvlm", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor packed, Tensor? bias, str post, str algorithm) -> Tensor")
_LIB.define("packed_linear_add(Tensor x, Tensor residual, Tensor packed, Tensor? bias) -> Tensor")


def _packed_linear_impl(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, post: str,
                        algorithm: str) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post, [], algorithm)


def _packed_linear_add_impl(x: torch.Tensor, residual: torch.Tensor, packed: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")


def _packed_linear_fake(x, packed, bias, post, algorithm):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _packed_linear_add_fake(x, residual, packed, bias):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# CompositeExplicitAutograd: the packed weight is an MkldnnCPU tensor, so a "CPU" kernel is not found
_LIB.impl("packed_linear", _packed_linear_impl, "CompositeExplicitAutograd")
_LIB.impl("packed_linear_add", _packed_linear_add_impl, "CompositeExplicitAutograd")
torch.library.register_fake("smolvlm::packed_linear", _packed_linear_fake, lib=_LIB)
torch.library.register_fake("smolvlm::packed_linear_add", _packed_linear_add_fake, lib=_LIB)
_packed_linear_op = torch.ops.smolvlm.packed_linear.default
_packed_linear_add_op = torch.ops.smolvlm.packed_linear_add.default


_PACKING = threading.Lock()  # a pending layer packs once, whichever thread uses it first


def _pack(weight: torch.Tensor, rows: int = 1) -> torch.Tensor:
    # rows=1: the layout oneDNN picks for one activation row (decode); larger batches
    # (prefill) run on the same packed weight at least as fast as F.linear (measured, 900 rows).
    # The vision tower packs for its 1024 patch rows per tile.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


class PackedLinear(nn.Module):
    """``nn.Linear`` replacement for CPU inference; see the module docstring."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int = 1) -> None:
        super().__init__()
        self._setup(tuple(weight.shape), weight.dtype, weight.device, bias, rows)
        self.packed = _pack(weight, rows)  # not a parameter, never trained

    def _setup(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
               bias: torch.Tensor | None, rows: int) -> None:
        if not packing_available(dtype, device):
            raise ValueError(f"cannot pack a {dtype} weight on {device}: CPU + oneDNN, "
                             f"{' or '.join(str(d) for d in PACKABLE_DTYPES)} only, bf16 only on CPUs with "
                             f"AVX-512 or AVX-NE-CONVERT")
        self.out_features, self.in_features = shape
        self.rows = rows  # the activation rows oneDNN's layout is chosen for
        self.weight_dtype = dtype
        self._packed: torch.Tensor | None = None
        self._later: Callable[[], torch.Tensor] | None = None  # reads the dense weight (``later``)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows: int = 1) -> "PackedLinear":
        return cls(linear.weight, linear.bias, rows)

    @classmethod
    def later(cls, read_weight: Callable[[], torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
              bias: torch.Tensor | None = None, rows: int = 1) -> "PackedLinear":
        """A layer that reads its (out, in) ``dtype`` weight with ``read_weight()`` and packs it on
        first use (a forward, ``packed``, ``.to()``); until then it holds no weight. What the loader
        builds (``pack="auto"``), so that loading costs what mapping the file does; see ``pack_linears``."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(shape, dtype, "cpu", bias, rows)
        self._later = read_weight
        return self

    @property
    def packed(self) -> torch.Tensor:
        """oneDNN's blocked weight; a layer built with ``later`` reads and packs it here, once."""
        if self._packed is None:
            with _PACKING:
                if self._packed is None:
                    weight = self._later()
                    if tuple(weight.shape) != (self.out_features, self.in_features):
                        raise RuntimeError(f"read a {list(weight.shape)} weight for a packed "
                                           f"[{self.out_features}, {self.in_features}] layer")
                    self._packed = _pack(weight.to(self.weight_dtype), self.rows)
                    self._later = None
        return self._packed

    @packed.setter
    def packed(self, value: torch.Tensor) -> None:
        self._packed, self._later, self.weight_dtype = value, None, value.dtype

    @property
    def pending(self) -> bool:
        """Whether the weight is still to be read and packed (``later``)."""
        return self._packed is None

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight (for saving and inspection; the forward never uses it). A pending
        layer reads it without packing it."""
        return self._later() if self._packed is None else self._packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, "none", "")

    def forward_gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu_tanh(self(x))`` as one kernel (oneDNN eltwise post-op)."""
        return self._run(x, "gelu", "tanh")

    def _run(self, x: torch.Tensor, post: str, algorithm: str) -> torch.Tensor:
        in_dtype = x.dtype
        if in_dtype != self.weight_dtype:
            x = x.to(self.weight_dtype)
        if x.numel() == 0:
            y = x.new_empty(*x.shape[:-1], self.out_features)
            y = y if post == "none" else F.gelu(y, approximate=algorithm)
        elif torch.compiler.is_compiling():
            y = _packed_linear_op(x.contiguous(), self.packed, self.bias, post, algorithm)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, post, [], algorithm)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def decode_weights(self, dtype: torch.dtype, rows: int = 1) -> tuple[str, torch.Tensor, torch.Tensor] | None:
        """How ``kernels/decode_layers.cpp`` runs this layer for ``rows`` rows of ``dtype`` (any number), as
        ``forward`` and ``forward_add`` do (``model.fused_decode``): ("packed", oneDNN's weight, the same),
        or None (a bias, another dtype)."""
        if self.bias is not None or dtype != self.weight_dtype:
            return None
        return "packed", self.packed, self.packed

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` as one kernel (oneDNN binary post-op)."""
        if x.numel() == 0 or x.dtype != self.weight_dtype or residual.dtype != self.weight_dtype:
            return residual + self(x)
        if torch.compiler.is_compiling():
            return _packed_linear_add_op(x.contiguous(), residual.contiguous(), self.packed, self.bias)
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), residual.contiguous(), self.packed,
                                                         self.bias, "add")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: checkpoint {list(w.shape)} vs "
                                  f"model {[self.out_features, self.in_features]}")
            else:
                self.packed = _pack(w.to(self.weight_dtype), self.rows)
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        dense = fn(self.weight)
        if not packing_available(dense.dtype, dense.device):
            raise RuntimeError(f"a packed model stays on the CPU in the dtypes this CPU can pack "
                               f"({', '.join(str(d) for d in PACKABLE_DTYPES if packing_available(d))}); "
                               "load it again without packing to move it to another device or dtype")
        self.packed = _pack(dense, self.rows)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"packed {self.weight_dtype}" + (" (on first use)" if self.pending else "")


class PackedFused(PackedLinear):
    """Linears that read the same input (q/k/v, gate/up) as ONE packed weight: one GEMM or GEMV
    instead of two or three (256M bf16 decode step 27.9 -> 25.6 ms; vision ~10% per tile).

    ``forward`` returns the parts' outputs as a tuple. It owns no state-dict entries: the
    ``PackedPart`` modules left at the original names save and load their own rows of it, so
    checkpoints and ``state_dict()`` keep the plain layout."""

    def __init__(self, linears: list[nn.Linear], rows: int = 1) -> None:
        biases = [lin.bias for lin in linears]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            raise ValueError("fused linears must all have a bias or all have none")
        weight = torch.cat([lin.weight.detach() for lin in linears])
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        super().__init__(weight, bias, rows)
        self.sizes = [lin.out_features for lin in linears]

    @classmethod
    def later_parts(cls, read_weights: list[Callable[[torch.Tensor], torch.Tensor]], sizes: list[int],
                    in_features: int, dtype: torch.dtype, biases: list[torch.Tensor | None],
                    rows: int = 1) -> "PackedFused":
        """``PackedLinear.later`` for linears fused into one: on first use each ``read_weights[i](out)``
        fills its rows of the fused weight (no per-part copies to concatenate: at 2.2B the
        concatenation was 1.4 of a 10.6 s packing)."""
        if any(b is None for b in biases) and any(b is not None for b in biases):
            raise ValueError("fused linears must all have a bias or all have none")
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])

        def read() -> torch.Tensor:
            weight = torch.empty(sum(sizes), in_features, dtype=dtype)
            start = 0
            for read_part, n in zip(read_weights, sizes):
                read_part(weight[start:start + n])
                start += n
            return weight

        self = cls.later(read, (sum(sizes), in_features), dtype, bias, rows)
        self.sizes = list(sizes)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return self.joint(x).split(self.sizes, dim=-1)

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side, unsplit (..., sum(sizes))."""
        return super().forward(x)

    def rows_of(self, index: int) -> slice:
        start = sum(self.sizes[:index])
        return slice(start, start + self.sizes[index])

    def load_part(self, index: int, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        dense = self.weight
        dense[self.rows_of(index)] = weight.to(dense.dtype)
        self.packed = _pack(dense, self.rows)
        if bias is not None and self.bias is not None:
            with torch.no_grad():
                self.bias[self.rows_of(index)] = bias.to(self.bias.dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        pass  # the parts save their rows

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        pass  # the parts load their rows


class PackedPart(nn.Module):
    """One projection of a ``PackedFused`` (or, unpacked, a ``DenseFused``) at its original name
    (``q_proj``...): its ``weight`` and state-dict rows are that slice of the fused weight; calling
    it alone runs the fused GEMM."""

    def __init__(self, fused: PackedFused, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a child: registered once, at its own name
        self.index = index
        self.in_features, self.out_features = fused.in_features, fused.sizes[index]

    @property
    def weight(self) -> torch.Tensor:
        return self.fused.weight[self.fused.rows_of(self.index)]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.fused.bias
        return None if b is None else b.detach()[self.fused.rows_of(self.index)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[self.index]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        if self.fused.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        names = ["weight"] + (["bias"] if self.fused.bias is not None else [])
        found = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        if strict:
            missing_keys.extend(prefix + n for n in names if n not in found)
        w = found.get("weight")
        if w is not None and tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: checkpoint {list(w.shape)} vs "
                              f"model {[self.out_features, self.in_features]}")
        elif w is not None:
            self.fused.load_part(self.index, w, found.get("bias"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, part {self.index} of a fused linear"


class DenseFused(nn.Linear):
    """The unpacked form of a ``PackedFused``: the fused weight as a plain ``nn.Linear`` parameter,
    for ``torch.compile`` with freezing (``generation/compiled.py``, mode "max-autotune"), whose GEMM
    templates want a dense constant weight. Same calls and state dict as ``PackedFused``: ``forward``
    returns the parts' outputs; its ``PackedPart`` modules save and load their rows."""

    def __init__(self, fused: PackedFused) -> None:
        super().__init__(fused.in_features, fused.out_features, bias=fused.bias is not None, device="meta")
        self.weight = nn.Parameter(fused.weight, requires_grad=False)
        if fused.bias is not None:
            self.bias = nn.Parameter(fused.bias.detach(), requires_grad=False)
        self.sizes = list(fused.sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return self.joint(x).split(self.sizes, dim=-1)

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side, unsplit (..., sum(sizes))."""
        return F.linear(x, self.weight, self.bias)

    rows_of = PackedFused.rows_of

    @torch.no_grad()
    def load_part(self, index: int, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight[self.rows_of(index)] = weight.to(self.weight.dtype)
        if bias is not None and self.bias is not None:
            self.bias[self.rows_of(index)] = bias.to(self.bias.dtype)

    # no state-dict entries of its own: the parts save and load their rows
    _save_to_state_dict = PackedFused._save_to_state_dict
    _load_from_state_dict = PackedFused._load_from_state_dict


@torch.no_grad()
def unpack_linears(model: nn.Module, prefixes: tuple[str, ...] = ("model.text_model.", "lm_head")) -> list[str]:
    """Turn the packed linears under ``prefixes`` back into dense ones, in place, keeping fused
    groups fused (``PackedFused`` -> ``DenseFused``, ``PackedLinear`` -> ``nn.Linear``). Returns the
    unpacked names. For ``torch.compile`` with freezing, which packs dense weights its own way."""
    done = []
    for name, module in list(model.named_modules()):
        if not name.startswith(prefixes) or not isinstance(module, PackedLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, PackedFused):
            dense: nn.Module = DenseFused(module)
            for part in parent.children():
                if isinstance(part, PackedPart) and part.fused is module:
                    object.__setattr__(part, "fused", dense)
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            dense.weight = nn.Parameter(module.weight, requires_grad=False)
            if module.bias is not None:
                dense.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        setattr(parent, child, dense)
        done.append(name)
    return done


def pack_pending(model: nn.Module) -> int:
    """Read and pack now every layer that would on first use (``PackedLinear.later``); returns how
    many. For a server, whose first requests should not pay it."""
    pending = [m for m in model.modules() if isinstance(m, PackedLinear) and m.pending]
    for m in pending:
        m.packed  # noqa: B018 - the property packs
    return len(pending)


# Projections of one input that packing fuses: (parts, the fused module's name).
FUSED_GROUPS = ((("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj"))


def fused_outputs(module: nn.Module, fused_name: str, parts: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The parts' outputs for input ``x``: one fused GEMM when packing fused them; one call too where
    the parts' class runs several layers of one input together (``forward_together``: the int8/int4
    decode kernels; it returns the outputs side by side, (rows, sum of widths), or None), else each alone."""
    fused = getattr(module, fused_name, None)
    if fused is not None:
        return fused(x)
    mods = [getattr(module, p) for p in parts]
    y = _together(mods, x)
    if y is not None:
        return tuple(y.split([m.out_features for m in mods], -1))
    return tuple(m(x) for m in mods)


def joint_outputs(module: nn.Module, parts: tuple[str, ...], x: torch.Tensor) -> torch.Tensor | None:
    """The parts' outputs side by side, (..., sum of widths), from one call of their class's
    ``forward_together``; None where it would not run them (then call each)."""
    return _together([getattr(module, p) for p in parts], x)


def _together(mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    together = getattr(type(mods[0]), "forward_together", None)
    if together is None or any(type(m) is not type(mods[0]) for m in mods):
        return None
    y = together(mods, x.reshape(-1, x.shape[-1]))
    return None if y is None else y.reshape(*x.shape[:-1], y.shape[-1])


def linear_gelu_tanh(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(linear(x))``: one fused kernel when ``linear`` is packed."""
    if isinstance(linear, PackedLinear) and x.dtype == linear.packed.dtype:
        return linear.forward_gelu_tanh(x)
    return F.gelu(linear(x), approximate="tanh")


def linear_add(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``: one fused kernel when ``linear`` is packed."""
    if isinstance(linear, PackedLinear):
        return linear.forward_add(x, residual)
    return residual + linear(x)


VISION_ROWS = 1024  # patch rows per 512 px tile: the vision tower's packed layout


def pack_targets(model: nn.Module, text: bool = True) -> list[str]:
    """Names of the plain ``nn.Linear`` modules packing replaces: the text decoder's and lm_head
    (unless ``text`` is false: ``upcast.GemvLinear`` runs them instead), and the vision tower's when
    it is bf16, or float32 where packing float32 pays (see the module docstring).

    Not the layers inside another linear-like module (a LoRA layer's ``lora_A``/``lora_B``):
    those belong to a layer that is not packed and may be training."""
    modules = dict(model.named_modules())
    inside_linear = lambda name: isinstance(modules.get(name.rpartition(".")[0]), nn.Linear)  # noqa: E731
    return [name for name, m in modules.items()
            if type(m) is nn.Linear and not inside_linear(name)
            and ((text and (name.startswith("model.text_model.") or name == "lm_head"))
                 or (name.startswith("model.vision_model.") and _vision_packs(m.weight.dtype)))]


def _vision_packs(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 or (dtype == torch.float32 and _f32_onednn_pays())


@torch.no_grad()
def pack_linears(model: nn.Module, auto: bool = False,
                 read_linear: Callable[[str], nn.Module] | None = None,
                 read_later: Callable[[str], tuple[Callable[..., torch.Tensor], torch.Tensor | None]] | None = None,
                 text: bool = True) -> list[str]:
    """Swap the text decoder's and lm_head's ``nn.Linear`` for ``PackedLinear`` in place.

    A no-op (returns []) where packing is unavailable (not CPU, fp16, no oneDNN). Quantized and
    LoRA layers are left alone, LoRA's inner A/B too (only exact ``nn.Linear`` is packed). A tied lm_head gets
    its own packed copy; the embedding keeps its table for lookups. ``auto``: only where packing is
    faster on this CPU (``packing_pays``). ``text=False``: the vision tower's only. Returns the packed names.

    ``read_linear`` (the loader): the targets are still empty (meta) and ``read_linear(name)`` gives
    each one's dense layer on demand, packed and dropped before the next is read, so the dense
    model never exists whole; the caller has already decided that packing applies.

    ``read_later`` (the loader, instead): ``read_later(name)`` gives (a function reading that
    layer's weight, its bias) and each target becomes a layer that reads and packs its weight on
    first use (``PackedLinear.later``). Loading then costs what mapping the file costs, and the
    reading and reordering (SmolVLM-2.2B: 7-11 s against transformers' 1.4-1.7 s load, 2-core AMD
    EPYC with AVX-512) move into the first forward, layer by layer, which needed them anyway.
    """
    names = pack_targets(model, text)
    if not names:
        return []
    if read_linear is None and read_later is None:
        first = model.get_submodule(names[0]).weight
        if not (packing_pays if auto else packing_available)(first.dtype, first.device):
            return []
        read_linear = model.get_submodule
    targets = set(names)
    # Only the modules that can hold a fused group: a list of every module would keep each replaced
    # dense weight alive until the end (peak RSS +100 MiB at 256M).
    parents = [(n, m) for n, m in model.named_modules() if any(hasattr(m, f) for _, f in FUSED_GROUPS)]
    for parent_name, parent in parents:
        rows = VISION_ROWS if parent_name.startswith("model.vision_model.") else 1
        for parts, fused_name in FUSED_GROUPS:
            full = [f"{parent_name}.{p}" for p in parts]
            if hasattr(parent, fused_name) and all(n in targets for n in full):
                if read_later is not None:
                    later = [read_later(n) for n in full]
                    empty = [model.get_submodule(n) for n in full]
                    fused = PackedFused.later_parts([read for read, _ in later], [m.out_features for m in empty],
                                                    empty[0].in_features, empty[0].weight.dtype,
                                                    [bias for _, bias in later], rows)
                else:
                    fused = PackedFused([read_linear(n) for n in full], rows)
                setattr(parent, fused_name, fused)
                for i, p in enumerate(parts):
                    setattr(parent, p, PackedPart(fused, i))  # the dense weight goes here
                targets -= set(full)
    for name in sorted(targets, key=names.index):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        rows = VISION_ROWS if name.startswith("model.vision_model.") else 1
        if read_later is not None:
            empty, (read, bias) = getattr(parent, child), read_later(name)
            packed = PackedLinear.later(read, (empty.out_features, empty.in_features), empty.weight.dtype, bias, rows)
        else:
            packed = PackedLinear.from_linear(read_linear(name), rows)  # the dense weight goes here
        setattr(parent, child, packed)
    return names
