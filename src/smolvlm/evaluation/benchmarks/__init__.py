"""The seeds' benchmarks, one module each (``BENCHMARK = Benchmark(...)``), imported on use.

``get_benchmark(name)`` -> the module's ``Benchmark``; ``BENCHMARKS``: name -> module path. Each
module's docstring gives the hub data it reads, the VLMEvalKit prompt it reproduces and how our
run differs from the SmolVLM authors'.
"""

from __future__ import annotations

import importlib

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item

__all__ = ["BENCHMARKS", "Benchmark", "BuildContext", "Item", "get_benchmark"]

_PKG = "smolvlm.evaluation.benchmarks"
BENCHMARKS: dict[str, str] = {
    name: f"{_PKG}.{name}"
    for name in ("docvqa", "textvqa", "chartqa", "ocrbench", "ai2d", "scienceqa", "mmmu", "mmstar",
                 "mathvista", "videomme", "mvbench", "mlvu")
}


def get_benchmark(name: str) -> Benchmark:
    """The ``Benchmark`` of ``--task name``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name]).BENCHMARK
