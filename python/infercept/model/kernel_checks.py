"""Argument checks shared by the native kernels' torch wrappers (CPU and CUDA)."""

from __future__ import annotations

import torch


def check_layout(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Raises ValueError unless ``tensor`` has this dtype and shape and is contiguous (the
    kernels index raw memory)."""
    if tensor.dtype != dtype:
        raise ValueError(f"{name} is {tensor.dtype}, expected {dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} with strides {tensor.stride()} is not contiguous")
