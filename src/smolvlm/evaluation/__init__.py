"""Evaluation.

* Benchmarks (``smolvlm eval --task docvqa --data PATH``): ``benchmarks/`` (one module per
  benchmark: data layout, the authors' prompt, category), ``scoring/`` (the reference scoring rules,
  pure Python), ``dataset_files.py`` (parquet/JSON streamed with pyarrow), ``bench_runner.py``
  (batched, resumable, sharded generation; scoring; results), ``predictions.py``, ``shard.py``,
  ``report.py``.
* The held-out synthetic set: ``metrics.py``, ``tasks/``, ``runner.py``
  (``evaluate(model, processor, EvalConfig(task="synth", n=200))``).

Names below are imported on first use, so that scoring (no torch) stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"EvalConfig": "runner", "evaluate": "runner", "aggregate": "metrics", "anls": "metrics",
         "exact_match": "metrics"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"smolvlm.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'smolvlm.evaluation' has no attribute {name!r}")
