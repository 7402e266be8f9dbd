"""Torch-facing wrappers of the native CPU kernels in ``infercept._core``.

The native side takes raw addresses (``tensor.data_ptr()``), so every dtype, device, contiguity
and shape check of the torch tensors happens here, before an address crosses the boundary.
"""

from __future__ import annotations

import torch

from infercept import _core
from infercept.model.kernel_checks import check_layout


def has_native_decode() -> bool:
    """Whether ``infercept._core`` was built with the CPU paged decode-attention kernel."""
    return hasattr(_core, "paged_decode_attention")


def can_run_native_decode(query: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor) -> bool:
    """Whether :func:`paged_decode_attention` takes these tensors (a query of any layout can be
    made contiguous; the caches must already be): float32 and on CPU."""
    return has_native_decode() and all(
        t.dtype == torch.float32 and t.device.type == "cpu" for t in (query, key_cache, value_cache)
    ) and key_cache.is_contiguous() and value_cache.is_contiguous()


def _check(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; the kernel reads CPU memory")
    check_layout(name, tensor, dtype, shape)


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of one query token per sequence, read straight from the paged cache.

    No context is gathered: the kernel walks each sequence's block table. Query heads
    ``h * group .. h * group + group - 1`` share KV head ``h``.

    Args:
        query: ``[B, num_heads, head_dim]`` float32, RoPE applied.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` float32.
        value_cache: Same shape and dtype as ``key_cache``.
        block_tables: ``[B, max_blocks]`` int32 block ids per sequence; entries past
            ``ceil(context_lens[i] / block_size)`` are not read.
        context_lens: ``[B]`` int32 cached tokens per sequence, including the query's own.
        scale: Softmax scale, usually ``head_dim ** -0.5``.
        out: Optional ``[B, num_heads, head_dim]`` float32 result buffer.

    Returns:
        ``out`` (or a new tensor) ``[B, num_heads, head_dim]`` float32.

    Raises:
        RuntimeError: ``infercept._core`` has no native kernel.
        ValueError: A tensor has the wrong dtype, device, shape or layout, or (from the kernel)
            a context length or block id is out of range.
    """
    if not has_native_decode():
        raise RuntimeError("infercept._core has no paged_decode_attention; rebuild the package")
    if query.dim() != 3 or key_cache.dim() != 4 or block_tables.dim() != 2:
        raise ValueError(f"expected query [B, H, D], caches [N, block, H_kv, D] and block_tables "
                         f"[B, max_blocks]; got {query.dim()}, {key_cache.dim()} and "
                         f"{block_tables.dim()} dimensions")
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads = key_cache.shape[:3]
    max_blocks = block_tables.shape[1]
    _check("query", query, torch.float32, (num_seqs, num_heads, head_dim))
    _check("key_cache", key_cache, torch.float32,
           (num_blocks, block_size, num_kv_heads, head_dim))
    _check("value_cache", value_cache, torch.float32, tuple(key_cache.shape))
    _check("block_tables", block_tables, torch.int32, (num_seqs, max_blocks))
    _check("context_lens", context_lens, torch.int32, (num_seqs,))
    if out is None:
        out = torch.empty_like(query)
    _check("out", out, torch.float32, tuple(query.shape))
    if query.numel() and out.untyped_storage().data_ptr() == query.untyped_storage().data_ptr():
        raise ValueError("out shares storage with query; the kernel writes out while reading query")
    _core.paged_decode_attention(
        out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
        block_tables.data_ptr(), context_lens.data_ptr(), num_seqs, num_heads, num_kv_heads,
        head_dim, block_size, max_blocks, num_blocks, float(scale))
    return out
