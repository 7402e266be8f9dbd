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


@pytest.fixture(scope="session")
def hf_reference():
    """transformers' Llama on the embedded SmolLM2 GGUF (float32, eval): the reference of the
    model, engine and sampling tests, loaded (dequantised) once per session, not per module."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")
    import torch
    from infercept.weights.default import default_model_path
    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()


@pytest.fixture(scope="session")
def hf_greedy(hf_reference):
    """greedy(prompt_ids, max_new_tokens) -> transformers' greedy continuation (token ids),
    memoised for the session: the model and engine tests compare against the same four prompts'
    48 tokens, so ``generate`` runs once for both."""
    import torch
    done: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def greedy(ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(ids), max_new_tokens)
        if key not in done:
            with torch.no_grad():
                out = hf_reference.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                            do_sample=False, attention_mask=torch.ones(1, len(ids)))
            done[key] = out[0, len(ids):].tolist()
        return list(done[key])

    return greedy
