"""Shared fixtures: the paper's trace, located beside the repository (never copied into it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def trace_path() -> Path:
    """The mixed workload trace: $INFERCEPT_TRACE, else ../shared/workloads beside the repo."""
    env = os.environ.get("INFERCEPT_TRACE")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "workloads" / "infercept_mixed.json"


@pytest.fixture(scope="session")
def trace_file() -> Path:
    path = trace_path()
    if not path.is_file():
        pytest.skip(f"workload trace not found at {path} (set INFERCEPT_TRACE)")
    return path


@pytest.fixture(scope="module")
def model():
    """The embedded SmolLM2 (float32), loaded once per test module that asks for it."""
    from infercept.model import load_model
    return load_model()


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2's tokenizer."""
    from infercept.model import Tokenizer
    from infercept.weights.default import default_model_path
    return Tokenizer.from_path(default_model_path())
