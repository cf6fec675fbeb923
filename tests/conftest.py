"""Shared test fixtures: where the reference config sets live, tiny configs, seeds.

The reference files (../shared/reference/<checkpoint>/) are required, never optional: a missing
folder is an error, so no test silently skips in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("SMOLVLM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
CHECKPOINTS = ("SmolVLM-256M-Instruct", "SmolVLM-500M-Instruct", "SmolVLM-Instruct", "SmolVLM2-2.2B-Instruct")


def reference(name: str) -> Path:
    """Folder of a reference config set; fails loudly if absent."""
    p = REFERENCE_DIR / name
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"reference files not found at {p}; set SMOLVLM_REFERENCE_DIR to the shared/reference folder"
        )
    return p


@pytest.fixture(scope="session")
def ref256() -> Path:
    return reference("SmolVLM-256M-Instruct")


@pytest.fixture(scope="session")
def ref2b() -> Path:
    return reference("SmolVLM2-2.2B-Instruct")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-model tests: the test machine is shared, and two
    threads on a busy box made these tiny matmuls ~50x slower. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
