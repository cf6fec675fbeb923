"""Evaluation tasks: each turns a benchmark into generation requests with gold answers.

A task module exposes ``build_requests(n, seed, *, max_new_tokens, ...) -> list[Request]``;
``TASKS`` maps a task name to that module. The runner only sees ``Request``s: it generates an
answer for each and scores it with ``metrics.METRICS[request.metric]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from types import ModuleType
from typing import Any

# name -> module path (imported on use)
TASKS: dict[str, str] = {
    "synth": "smolvlm.evaluation.tasks.synth",
}


@dataclass(frozen=True)
class Request:
    """One generation request and how to score it.

    ``messages``: chat messages whose ``{"type": "image"}`` items take ``images`` in order (the
    processor's convention); rendered with the generation prompt. ``headline``: counted in the
    task's ``overall`` score (else reported per category only).
    """

    id: str
    category: str
    messages: list[dict[str, Any]]
    images: list[Any]
    gold: str
    question: str
    metric: str = "exact_match"
    headline: bool = True
    max_new_tokens: int = 16
    meta: dict[str, Any] = field(default_factory=dict)


def get_task(name: str) -> ModuleType:
    """The task module called ``name``; a clear ValueError for an unknown one."""
    if name not in TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; known: {sorted(TASKS)}")
    return import_module(TASKS[name])
