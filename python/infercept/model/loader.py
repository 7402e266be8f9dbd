"""Builds a model from a path: a GGUF file, an HF directory, or the embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from infercept.model.config import ModelConfig
from infercept.model.llama import LlamaForCausalLM
from infercept.weights.default import default_model_path
from infercept.weights.errors import WeightsNotFoundError
from infercept.weights.gguf import load_gguf
from infercept.weights.hf import load_hf


def resolve_model_path(path: str | os.PathLike[str] | None) -> Path:
    """The given path, or the embedded SmolLM2 GGUF when None.

    Raises:
        WeightsNotFoundError: The path does not exist, or the default model is not installed.
    """
    if path is None:
        return default_model_path()
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"model path {path} does not exist")
    return path


def load_weights(path: str | os.PathLike[str] | None,
                 dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and HF-named weights from a ``.gguf`` file or an HF directory (None: default)."""
    path = resolve_model_path(path)
    if path.is_dir():
        return load_hf(path, dtype)
    return load_gguf(path, dtype)


def load_model(path: str | os.PathLike[str] | None = None,
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Loads a Llama-family model for the paged forward.

    Args:
        path: A ``.gguf`` file, an HF model directory, or None for the embedded SmolLM2.
        dtype: Weight dtype: float32 (default), bfloat16 or float16.

    Raises:
        WeightsNotFoundError: A path or file is missing.
        InvalidWeightsError: A file is malformed or does not fit a Llama-family model.
    """
    config, weights = load_weights(path, dtype)
    return LlamaForCausalLM.from_state_dict(config, weights, dtype)
