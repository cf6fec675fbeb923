"""Opt-in compiled decode step: ``torch.compile`` (Inductor's C++/OpenMP backend on CPU).

One decode step (embed, 30 decoder layers, norm, head) becomes one generated C++ graph: the
RMSNorms, RoPE, cache writes, SiLU-gates and residual adds that eager PyTorch runs as ~1,000
small kernels and Python calls per token are fused; the GEMVs stay oneDNN's (packed bf16) or
the int8/int4 kernels (smolvlm's or torch's), called from the graph (``model/packed.py`` wraps the packed ones as
opaque ``torch.library`` ops for it). As gpt-fast does, the step runs on a static KV cache and attends over
the whole cache with an explicit mask, so every step of a generation has the same shapes: one
compile per (batch rows, cache length) bucket. Cache lengths are rounded up to ``BUCKET`` slots;
a longer context or another batch size compiles again (Inductor keeps compiled graphs on disk,
so the next process skips most of it, not the tracing).

It pays only when many tokens follow one compile (a long answer, a chat session, a benchmark):
the first step of a bucket takes tens of seconds. Prefill stays eager.

Two modes (``MODES``), named as ``torch.compile``'s:
- ``"default"``: the weights stay graph inputs, so Inductor's on-disk cache serves the next
  process (5-7 s per bucket once cached, 256M).
- ``"max-autotune"``: freezing (the weights become constants of the graph) + max-autotune with
  Inductor's C++ GEMM templates, which generate the GEMVs themselves (AMX/AVX-512 micro-kernels,
  epilogues fused) where oneDNN's calls cost ~18 us of overhead each (256M bf16 step at 900 ctx:
  ~17 ms against ~22.5). The text linears are unpacked to dense ones for it
  (``packed.unpack_linears``), and the graph holds its own packed copy of them: the text weights'
  memory twice, per bucket. A float graph is never served from the disk cache (Inductor does not
  cache graphs that hold oneDNN constants): 45-50 s per bucket in every process, 256M bf16, 2 cores
  (int8/int4 graphs have none: ~13 s once cached).
  Weights changed after the compile are not seen by it.

Dynamo's per-call guards on the model's modules are skipped (``torch.compiler``'s
``skip_guard_on_all_nn_modules_unsafe``: checking ~400 module attributes and tensors was ~1.7 ms of a
~20 ms int4 step on a 2-core AMD EPYC, ``bench/ANALYSIS.md``, twelfth round). What they protected, the
model staying as it was compiled, is checked once per generation instead (``CompiledDecode.check``,
called by ``generate``): a model changed since (modules swapped, dtypes or shapes changed) decodes
eagerly from then on, said once, rather than through a graph that no longer fits it. Each step
compiles its own copy of the step function, so two models never share a graph.

Greedy tokens are the eager path's (``tests/unit/test_compiled_decode.py``); measured gains: ``bench/ANALYSIS.md``.
Without a C++ compiler, or if compiling fails, generation says why once on stderr and runs eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import shutil
import sys
import types
from typing import Any, Callable

import torch

from smolvlm import kernels
from smolvlm.model.packed import unpack_linears

_STEPS = itertools.count()  # names the compiled steps' code objects
BUCKET = 256  # cache slots per shape bucket: at most 255 slots of masked-out attention per step
# Inductor options per mode. "CPP,ATEN": each GEMM shape is timed against ATen's (oneDNN) and the
# faster one kept, so a CPU whose template is slower (or missing, AVX2 bf16) keeps oneDNN.
MODES: dict[str, dict[str, Any]] = {
    "default": {},
    # autotune_num_choices_displayed=0: no timing tables on stderr the first time a shape is tuned
    "max-autotune": {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                     "autotune_num_choices_displayed": 0},
}


def cache_slots(total: int) -> int:
    """The cache length a generation of ``total`` positions gets: ``total`` rounded up to ``BUCKET``."""
    return -(-total // BUCKET) * BUCKET


def compiler_problem() -> str | None:
    """Why Inductor cannot build CPU kernels here (no C++ compiler), or None."""
    try:
        from torch._inductor import config as inductor_config
        cxx = inductor_config.cpp.cxx
    except Exception as e:  # noqa: BLE001 - an odd torch build: say what failed
        return f"torch's Inductor backend is unavailable ({type(e).__name__}: {e})"
    names = [c for c in (cxx if isinstance(cxx, (tuple, list)) else (cxx,)) if c] or ["g++"]
    if not any(shutil.which(c) for c in names):
        return (f"torch.compile needs a C++ compiler on PATH ({', '.join(names)}) and none was found "
                "(Debian/Ubuntu: apt install g++)")
    return None


def fingerprint(model: Any) -> tuple:
    """What a compiled step takes as fixed about ``model``: each module's kind and training flag, its
    public plain attributes, and its parameters' and buffers' shapes, dtypes and devices (not their
    values, which the graph reads at every call). Private attributes are left out: they hold caches
    that the eager prefill may fill (an int8 layer's scales in the activation dtype)."""
    def describe(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (tuple(v.shape), v.dtype, v.device.type)
        if isinstance(v, (tuple, list)):
            return tuple(describe(x) for x in v)
        if v is None or isinstance(v, (bool, int, float, str, torch.dtype)):
            return v
        return type(v)

    return tuple(
        (name, type(m), m.training,
         tuple((k, describe(v)) for k, v in vars(m).items() if not k.startswith("_")),
         tuple((k, describe(v)) for k, v in (*m._parameters.items(), *m._buffers.items())))
        for name, m in model.named_modules())


def own_storage(model: Any, prefixes: tuple[str, ...] = ("model.text_model.", "lm_head")) -> None:
    """Give each ``nn.Linear`` weight and bias under ``prefixes`` that starts inside a larger storage (``storage_offset``
    not 0: the loader's zero-copy views of a checkpoint's file mapping) its own copy, in place (the
    ``Parameter`` stays, so ties hold).

    Why: with freezing, Inductor's C++ GEMM template (torch 2.13) packs a frozen weight through
    ``as_strided`` with the offset of its own IR layout, 0, which reads from the start of the
    underlying storage instead of the weight's. A float32 SmolVLM loaded unpacked (the CLI's default
    on AVX-512 CPUs) decoded NaN logits, token 0 over and over, on an AMD EPYC with AVX-512 where the
    template won the autotuning; the same weight with offset 0 is exact. Costs a private copy of those
    weights, next to the one the frozen graph packs anyway."""
    for name, module in model.named_modules():
        if name.startswith(prefixes) and isinstance(module, torch.nn.Linear):
            for t in module.parameters(recurse=False):
                if t.storage_offset() != 0:
                    t.data = t.data.clone()


class CompiledDecode:
    """The decode step of one model, compiled on first use per shape bucket.

    ``generate.generate_tokens`` uses it when ``enable(model)`` attached one. Call as
    ``step(tok (B, 1), mask (B, L), position_ids (B, 1), slot (1,), cache)`` with ``L`` the cache's
    full length; returns float32 logits (B, V). Eager fallback: same call, same results.
    """

    def __init__(self, model: Any, err: Any = None, mode: str = "default") -> None:
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.model = model
        self.err = err
        self.mode = mode
        self.problem = compiler_problem()
        self.buckets: set[tuple[int, int]] = set()
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._fingerprint: tuple | None = None  # the model as first compiled
        # The options must hold while Dynamo traces (freezing changes how it lifts the weights), not
        # only while Inductor compiles: torch.compile(options=) is too late. ~23 us a step; none by default.
        self._options: Callable[[], Any] = contextlib.nullcontext
        if self.problem is None:
            if MODES[mode]:
                from torch._inductor import config as inductor_config

                self._options = functools.partial(inductor_config.patch, MODES[mode])
            if MODES[mode].get("freezing"):
                unpack_linears(model)  # freezing packs dense weights its own way
                own_storage(model)
            kernels.prepare()  # smolvlm's CPU kernels, decided (and built) now: a trace cannot build them
            self._compiled = torch.compile(self._own_step(), fullgraph=True, dynamic=False, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        else:
            self._say(self.problem)

    def _own_step(self) -> Callable[..., torch.Tensor]:
        """``_eager`` with a code object of its own. Dynamo keeps compiled graphs per code object and,
        its module guards skipped, would otherwise run one model's graph for another (same structure,
        other dtypes) in the same process."""
        f = CompiledDecode._eager
        name = f"decode_step_{next(_STEPS)}"
        code = f.__code__.replace(co_name=name, co_qualname=name)
        return types.MethodType(types.FunctionType(code, f.__globals__, name, f.__defaults__, f.__closure__), self)

    def _eager(self, tok: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, slot: torch.Tensor,
               cache: Any) -> torch.Tensor:
        out = self.model(input_ids=tok, attention_mask=mask, position_ids=position_ids, kv_cache=cache,
                         input_pos=slot, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _say(self, why: str) -> None:
        print(f"smolvlm: compiled decode off, decoding eagerly: {why}", file=self.err or sys.stderr)

    def check(self) -> None:
        """Before a generation: decode eagerly from now on if the model changed since it was compiled
        (the compiled graph no longer guards each call against that)."""
        if self._compiled is not None and self._fingerprint is not None and fingerprint(self.model) != self._fingerprint:
            self.problem = "the model changed after its decode step was compiled"
            self._compiled = None
            self._say(self.problem)

    def __call__(self, tok: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, slot: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        if self._compiled is not None:
            try:
                with self._options():
                    logits = self._compiled(tok, mask, position_ids, slot, cache)
                self.buckets.add((tok.shape[0], mask.shape[1]))
                if self._fingerprint is None:
                    self._fingerprint = fingerprint(self.model)
                return logits
            except Exception as e:  # noqa: BLE001 - a compiler failure must not cost the answer
                self.problem = f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
                self._compiled = None
                self._say(self.problem)
        return self._eager(tok, mask, position_ids, slot, cache)


def enable(model: Any, err: Any = None, mode: str = "default") -> CompiledDecode:
    """Decode ``model``'s tokens through a compiled step from now on (see the module docstring;
    ``mode``: a key of ``MODES``); returns the step, whose ``problem`` says why it runs eagerly, if it does."""
    step = CompiledDecode(model, err, mode)
    model.compiled_decode = step
    return step


def disable(model: Any) -> None:
    model.__dict__.pop("compiled_decode", None)
