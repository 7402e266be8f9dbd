"""Torch-facing wrappers of the CUDA kernels in ``infercept._core`` (CUDA builds only).

The native side takes device addresses (``tensor.data_ptr()``) and a stream handle (torch's
current stream, so the kernels are ordered with the model's other work), so every dtype,
device, contiguity and shape check of the torch tensors happens here.
"""

from __future__ import annotations

import contextlib

import torch

from infercept import _core
from infercept.model.kernel_checks import check_layout

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
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


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def _on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    # Launches go to the current device: make it the tensors' device.
    if tensor.device.index is None or tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def _check(name: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype,
           shape: tuple[int, ...]) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")
    check_layout(name, tensor, dtype, shape)


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if its address is 16-byte aligned (what the kernels' vector loads need), else
    an aligned copy."""
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Writes new K/V ``[T, num_kv_heads, head_dim]`` into the paged caches at ``slot_mapping``.

    Args:
        key: ``[T, num_kv_heads, head_dim]`` (any layout; made contiguous).
        value: Same shape as ``key``.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, contiguous, CUDA.
        value_cache: Same shape, dtype and device as ``key_cache``.
        slot_mapping: ``[T]`` int64 ``block * block_size + offset``; negative slots are skipped.

    Raises:
        RuntimeError: ``infercept._core`` has no CUDA kernels.
        ValueError: A tensor has the wrong device, dtype, shape or layout.
    """
    if not has_cuda_kernels():
        raise RuntimeError("infercept._core has no CUDA kernels; rebuild with INFERCEPT_CUDA=ON")
    if key_cache.dim() != 4:
        raise ValueError(f"key_cache must be [num_blocks, block_size, H_kv, D], got {tuple(key_cache.shape)}")
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    device, dtype = key_cache.device, key_cache.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"key_cache is {dtype}; the kernel takes {sorted(map(str, _DTYPES))}")
    key, value = key.contiguous(), value.contiguous()
    num_tokens = key.shape[0]
    _check("key", key, device, dtype, (num_tokens, num_kv_heads, head_dim))
    _check("value", value, device, dtype, (num_tokens, num_kv_heads, head_dim))
    _check("value_cache", value_cache, device, dtype, tuple(key_cache.shape))
    _check("key_cache", key_cache, device, dtype, tuple(key_cache.shape))
    _check("slot_mapping", slot_mapping, device, torch.int64, (num_tokens,))
    with _on_device(key_cache):
        _core.cuda_write_kv_cache(key.data_ptr(), value.data_ptr(), key_cache.data_ptr(),
                                  value_cache.data_ptr(), slot_mapping.data_ptr(), num_tokens,
                                  num_kv_heads, head_dim, block_size, num_blocks, _DTYPES[dtype],
                                  _stream(key_cache))


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                    query_start: torch.Tensor | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Paged attention read straight from the cache: decode rows or causal prefill chunks.

    Row ``j`` of sequence ``s`` (``query_len`` rows, ``context_lens[s]`` cached tokens with its
    own K/V already written) attends causally to tokens ``0 .. context_len - query_len + j``.
    Query heads ``h * group .. h * group + group - 1`` share KV head ``h``.

    Args:
        query: ``[R, num_heads, head_dim]`` (RoPE applied), float32/float16/bfloat16.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, same dtype, contiguous.
        value_cache: Same shape as ``key_cache``.
        block_tables: ``[B, max_blocks]`` int32.
        context_lens: ``[B]`` int32.
        scale: Softmax scale.
        query_start: ``[B + 1]`` int32 row offsets of each sequence; None: decode, ``R == B``.
        out: Optional ``[R, num_heads, head_dim]`` result buffer (16-byte aligned, contiguous).

    Returns:
        ``out`` (or a new tensor) ``[R, num_heads, head_dim]``.

    Raises:
        RuntimeError: ``infercept._core`` has no CUDA kernels.
        ValueError: A tensor has the wrong device, dtype, shape or layout, or (from the
            launcher) an unsupported head_dim or head grouping.
    """
    if not has_cuda_kernels():
        raise RuntimeError("infercept._core has no CUDA kernels; rebuild with INFERCEPT_CUDA=ON")
    if query.dim() != 3 or key_cache.dim() != 4 or block_tables.dim() != 2:
        raise ValueError(f"expected query [R, H, D], caches [N, block, H_kv, D] and block_tables "
                         f"[B, max_blocks]; got {query.dim()}, {key_cache.dim()} and "
                         f"{block_tables.dim()} dimensions")
    device, dtype = query.device, query.dtype
    if device.type != "cuda" or dtype not in _DTYPES:
        raise ValueError(f"query is {dtype} on {device}; the kernel takes CUDA "
                         f"{sorted(map(str, _DTYPES))}")
    query = _aligned(query.contiguous())
    num_rows, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads = key_cache.shape[:3]
    num_seqs, max_blocks = block_tables.shape
    _check("key_cache", key_cache, device, dtype, (num_blocks, block_size, num_kv_heads, head_dim))
    _check("value_cache", value_cache, device, dtype, tuple(key_cache.shape))
    _check("block_tables", block_tables, device, torch.int32, (num_seqs, max_blocks))
    _check("context_lens", context_lens, device, torch.int32, (num_seqs,))
    if query_start is not None:
        _check("query_start", query_start, device, torch.int32, (num_seqs + 1,))
    elif num_rows != num_seqs:
        raise ValueError(f"query has {num_rows} rows but block_tables {num_seqs} sequences; "
                         "pass query_start for multi-token sequences")
    if out is None:
        out = torch.empty_like(query)
    _check("out", out, device, dtype, tuple(query.shape))
    if out.data_ptr() % 16:
        raise ValueError("out is not 16-byte aligned")
    if num_rows and out.untyped_storage().data_ptr() == query.untyped_storage().data_ptr():
        raise ValueError("out shares storage with query; the kernel writes out while reading query")
    with _on_device(query):
        _core.cuda_paged_attention(
            out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
            block_tables.data_ptr(), context_lens.data_ptr(),
            0 if query_start is None else query_start.data_ptr(), num_rows, num_seqs, num_heads,
            num_kv_heads, head_dim, block_size, max_blocks, num_blocks, float(scale),
            _DTYPES[dtype], _stream(query))
    return out
