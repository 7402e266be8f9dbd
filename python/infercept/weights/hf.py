"""Hugging Face model directory loader: config.json + (sharded) safetensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from infercept.model.config import ModelConfig
from infercept.weights.errors import InvalidWeightsError, WeightsNotFoundError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    """Reads ``config.json`` of an HF model directory.

    Raises:
        WeightsNotFoundError: The directory or its config.json is missing.
        InvalidWeightsError: config.json is not valid JSON or not a Llama-family config.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightsNotFoundError(f"model directory {model_dir} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise WeightsNotFoundError(f"{model_dir} has no config.json; is it an HF model directory?")
    try:
        return ModelConfig.from_hf_dict(json.loads(config_path.read_text()))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too.
        raise InvalidWeightsError(f"{config_path}: {exc}") from exc


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a directory: the single file, or every shard the index names.

    Raises:
        WeightsNotFoundError: Neither ``model.safetensors`` nor an index exists, or a shard the
            index names is missing.
        InvalidWeightsError: The index is not valid JSON or lacks ``weight_map``.
    """
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            shard_names = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise InvalidWeightsError(f"{index_path} is not a valid safetensors index: "
                                      f"{exc!r}") from exc
        shards = [model_dir / name for name in shard_names]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise WeightsNotFoundError(f"{index_path} names missing shards {missing}")
        return shards
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise WeightsNotFoundError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_hf(model_dir: str | os.PathLike[str],
            dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Reads an HF Llama-family model directory into a config and HF-named weights.

    Args:
        model_dir: Directory with config.json and model.safetensors or sharded
            ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``.
        dtype: Dtype of the returned tensors.

    Raises:
        WeightsNotFoundError: The directory, config.json or a weight file is missing.
        InvalidWeightsError: A file is malformed or truncated.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_hf_config(model_dir)
    weights = {}
    for shard in weight_files(Path(model_dir)):
        try:
            tensors = load_file(shard)
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidWeightsError(f"{shard} is not a valid safetensors file: {exc}") from exc
        weights.update((name, t.to(dtype)) for name, t in tensors.items())
    return config, weights
