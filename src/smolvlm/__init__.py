"""smolvlm: SmolVLM / SmolVLM2 vision-language models in plain PyTorch.

Public API (stable names):
    SmolVLM             model; ``SmolVLM.from_pretrained(path_or_repo_id, dtype=...)``
    SmolVLMConfig       typed config.json
    SmolVLMProcessor    images/video + chat -> model inputs
    stream              generator of text pieces for a prompt
    answer              the whole answer as one string (``"".join(stream(...))``)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from smolvlm.config import SmolVLMConfig, TextConfig, VisionConfig, preset

__version__ = "0.1.0"

# Lazy so that `import smolvlm` stays cheap (no torch import for config-only use).
_LAZY = {
    "SmolVLM": "smolvlm.model.vlm",
    "SmolVLMProcessor": "smolvlm.processing.processor",
    "stream": "smolvlm.generation.stream",
    "answer": "smolvlm.generation.stream",
}

__all__ = ["SmolVLM", "SmolVLMConfig", "SmolVLMProcessor", "TextConfig", "VisionConfig", "preset",
           "stream", "answer", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smolvlm' has no attribute {name!r}")
