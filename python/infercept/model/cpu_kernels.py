"""Torch-facing wrappers of the native CPU kernels in ``infercept._core``.

The native adapter checks every tensor's dtype, device, shape and strides and raises ValueError
naming the tensor; tensors cross the boundary as DLPack capsules, so no check is repeated here.
"""

from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from infercept import _core


def has_native_decode() -> bool:
    """Whether ``infercept._core`` was built with the CPU paged decode-attention kernel."""
    return hasattr(_core, "paged_decode_attention")


def native_decode_body(head_dim: int) -> str:
    """Which body of the native kernel runs for ``head_dim`` on this CPU.

    Args:
        head_dim: The attention head size.

    Returns:
        ``"avx512"``, ``"avx2"`` or ``"portable"`` (the widest the CPU has that takes
        ``head_dim``: a multiple of 16 for AVX-512, of 8 for AVX2), or ``"none"`` when
        ``infercept._core`` has no native kernel.
    """
    if not has_native_decode():
        return "none"
    if head_dim % 16 == 0 and _core.cpu_attention_has_avx512():
        return "avx512"
    if head_dim % 8 == 0 and _core.cpu_attention_has_avx2():
        return "avx2"
    return "portable"


def can_run_native_decode(query: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor) -> bool:
    """Whether :func:`paged_decode_attention` takes these tensors (a query of any layout can be
    made contiguous; the caches must already be): float32 and on CPU."""
    return has_native_decode() and all(
        t.dtype == torch.float32 and t.device.type == "cpu" for t in (query, key_cache, value_cache)
    ) and key_cache.is_contiguous() and value_cache.is_contiguous()


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> None:
    """Decode attention of one query token per sequence, read straight from the paged cache.

    No context is gathered: the kernel walks each sequence's block table. Query heads
    ``h * group .. h * group + group - 1`` share KV head ``h``. Every tensor is CPU and
    contiguous.

    Args:
        out: ``[B, num_heads, head_dim]`` float32, written; shares no memory with the inputs.
        query: ``[B, num_heads, head_dim]`` float32, RoPE applied.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` float32.
        value_cache: Same shape and dtype as ``key_cache``.
        block_tables: ``[B, max_blocks]`` int32 block ids per sequence; entries past
            ``ceil(context_lens[i] / block_size)`` are not read.
        context_lens: ``[B]`` int32 cached tokens per sequence, including the query's own.
        scale: Softmax scale, usually ``head_dim ** -0.5``.

    Raises:
        ValueError: A tensor has the wrong dtype, device, shape or layout, or a context length
            or block id is out of range (the message names it).
    """
    # to_dlpack is Tensor.__dlpack__ without its Python-level checks (~0.3 us instead of
    # several us a tensor), which matters at six tensors a layer a step.
    _core.paged_decode_attention(
        *map(to_dlpack, (out, query, key_cache, value_cache, block_tables, context_lens)),
        float(scale))


def has_native_linear() -> bool:
    """Whether ``infercept._core`` was built with the packed CPU linear kernel."""
    return hasattr(_core, "cpu_linear")


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in the native kernel's layout: column panels of 16, each k-major.

    Args:
        weight: ``[N, K]`` float32 on the CPU, rows contiguous.

    Returns:
        ``[ceil(N / 16), K, 16]`` float32: ``packed[p, k, j] = weight[16 p + j, k]``, zero for
        ``16 p + j >= N``.

    Raises:
        ValueError: ``weight`` is not float32 on the CPU with contiguous rows.
    """
    packed = torch.empty(_core.linear_packed_shape(*weight.shape), dtype=torch.float32)
    _core.pack_linear_weight(to_dlpack(packed), to_dlpack(weight.detach()))
    return packed


def cpu_linear(x: torch.Tensor, packed_weight: torch.Tensor, out_features: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + bias`` over a weight packed by :func:`pack_linear_weight`.

    Args:
        x: ``[T, K]`` float32 on the CPU, rows contiguous (a column slice of a wider tensor
            is read through its row stride, not copied).
        packed_weight: ``[ceil(N / 16), K, 16]`` float32.
        out_features: ``N``.
        bias: ``[N]`` float32, or None.

    Returns:
        ``[T, N]`` float32, new.

    Raises:
        ValueError: A tensor has the wrong dtype, device, shape or layout (the message names it).
    """
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    _core.cpu_linear(to_dlpack(out), to_dlpack(x), to_dlpack(packed_weight),
                     None if bias is None else to_dlpack(bias))
    return out


def has_native_layer_ops() -> bool:
    """Whether ``infercept._core`` has the CPU layer ops (rms_norm, add_rms_norm, silu_mul,
    rotary_write_kv)."""
    return hasattr(_core, "silu_mul")


def can_run_layer_ops(*tensors: torch.Tensor) -> bool:
    """Whether the native layer ops take these tensors: float32, CPU and contiguous."""
    return has_native_layer_ops() and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """``out = x / sqrt(mean(x^2, -1) + eps) * weight`` over rows ``[T, hidden]``; out may be x.

    Raises:
        ValueError: A tensor of the wrong dtype, device, shape or layout (named).
    """
    _core.rms_norm(to_dlpack(out), to_dlpack(x), to_dlpack(weight), float(eps))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> None:
    """In place: ``residual += x``, then ``x = rms_norm(residual) * weight`` (``[T, hidden]``
    each, disjoint): vLLM's fused_add_rms_norm.

    Raises:
        ValueError: As :func:`rms_norm`, or x and residual share memory.
    """
    _core.add_rms_norm(to_dlpack(x), to_dlpack(residual), to_dlpack(weight), float(eps))


def silu_mul(gate_up: torch.Tensor) -> None:
    """In place over a stacked gate/up GEMM's output ``[T, 2 * intermediate]``: the gate half
    becomes ``silu(gate) * up``, the up half is left as it was.

    Raises:
        ValueError: A tensor of the wrong dtype, device, shape or layout (named).
    """
    _core.silu_mul(to_dlpack(gate_up))


def rotary_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    key_cache: torch.Tensor, value_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """RoPE on the new query and key heads, in place, and their K/V written to the cache.

    Args:
        qkv: ``[T, num_heads + 2 * num_kv_heads, head_dim]`` float32: each token's query, key
            and value heads; the query and key heads are rotated in place.
        cos: ``[T, head_dim]`` float32 (rotate-half layout, :func:`rope_cos_sin`).
        sin: Same as ``cos``.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` float32; slot ``s`` is
            row ``s`` of it viewed as ``[num_blocks * block_size, num_kv_heads, head_dim]``.
        value_cache: Same as ``key_cache``.
        slot_mapping: ``[T]`` int64 slot of each token.

    Raises:
        ValueError: A bad tensor or a slot out of range (named); nothing is then written.
    """
    _core.rotary_write_kv(*map(to_dlpack, (qkv, cos, sin, key_cache, value_cache, slot_mapping)))
