"""Torch-facing wrappers of the CUDA kernels in ``infercept._core`` (CUDA builds only).

The native adapters check every tensor's device, dtype, shape and strides and raise ValueError
naming the tensor; tensors cross the boundary as DLPack capsules. What stays here is torch's
side of the call: its current stream, so that the kernels are ordered with the model's work.
"""

from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from infercept import _core

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)


def has_cuda_kernels() -> bool:
    """Whether ``infercept._core`` was built with the CUDA kernels."""
    return hasattr(_core, "cuda_paged_attention")


def can_run_cuda_attention(query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor) -> bool:
    """Whether :func:`paged_attention` takes these tensors: CUDA, one supported dtype,
    head_dim 64 or 128, contiguous caches (a query of any layout can be made contiguous)."""
    return (has_cuda_kernels() and query.is_cuda and query.dtype in _DTYPES
            and all(t.device == query.device and t.dtype == query.dtype and t.is_contiguous()
                    for t in (key_cache, value_cache))
            and query.shape[-1] in HEAD_DIMS)


def _require_kernels() -> None:
    if not has_cuda_kernels():
        raise RuntimeError("infercept._core has no CUDA kernels; rebuild with INFERCEPT_CUDA=ON")


def _stream(tensor: torch.Tensor) -> int:
    # A tensor off CUDA gets no stream: the adapter rejects it, naming it.
    return torch.cuda.current_stream(tensor.device).cuda_stream if tensor.is_cuda else 0


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Writes new K/V ``[T, num_kv_heads, head_dim]`` into the paged caches at ``slot_mapping``.

    Every tensor is on the caches' CUDA device and contiguous.

    Args:
        key: ``[T, num_kv_heads, head_dim]``, the caches' dtype.
        value: Same shape and dtype as ``key``.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, float32, float16 or
            bfloat16.
        value_cache: Same shape and dtype as ``key_cache``.
        slot_mapping: ``[T]`` int64 ``block * block_size + offset``; negative slots are skipped.

    Raises:
        RuntimeError: ``infercept._core`` has no CUDA kernels.
        ValueError: A tensor has the wrong device, dtype, shape or layout (the message names it).
    """
    _require_kernels()
    # to_dlpack: Tensor.__dlpack__ without its Python-level checks, ~0.3 us a tensor not several.
    _core.cuda_write_kv_cache(*map(to_dlpack, (key, value, key_cache, value_cache, slot_mapping)),
                              _stream(key_cache))


def paged_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float,
                    query_start: torch.Tensor | None = None) -> None:
    """Paged attention read straight from the cache: decode rows or causal prefill chunks.

    Row ``j`` of sequence ``s`` (``query_len`` rows, ``context_lens[s]`` cached tokens with its
    own K/V already written) attends causally to tokens ``0 .. context_len - query_len + j``.
    Query heads ``h * group .. h * group + group - 1`` share KV head ``h``. Every tensor is on
    the query's CUDA device and contiguous.

    Args:
        out: ``[R, num_heads, head_dim]`` result, the query's dtype, 16-byte aligned, sharing no
            memory with ``query``.
        query: ``[R, num_heads, head_dim]`` (RoPE applied), float32/float16/bfloat16, 16-byte
            aligned.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, the query's dtype.
        value_cache: Same shape as ``key_cache``.
        block_tables: ``[B, max_blocks]`` int32.
        context_lens: ``[B]`` int32.
        scale: Softmax scale.
        query_start: ``[B + 1]`` int32 row offsets of each sequence; None: decode, ``R == B``.

    Raises:
        RuntimeError: ``infercept._core`` has no CUDA kernels.
        ValueError: A tensor has the wrong device, dtype, shape, layout or alignment, or the
            head_dim or head grouping is unsupported (the message names it).
    """
    _require_kernels()
    _core.cuda_paged_attention(
        *map(to_dlpack, (out, query, key_cache, value_cache, block_tables, context_lens)),
        None if query_start is None else to_dlpack(query_start), float(scale), _stream(query))
