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
