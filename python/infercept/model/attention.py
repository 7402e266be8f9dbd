"""Attention over a paged KV cache for a flat batch of tokens from several sequences.

One path serves prefill, chunked prefill, recompute chunks and decode: each sequence's new tokens
attend to everything already cached for it plus themselves, causally. There is no separate
"prefill phase"; the scheduler may mix a recompute chunk with decodes in one step.

On CPU float32 every row of the step, decode token or chunk token, goes to the native kernel
of :mod:`infercept.model.cpu_kernels` as one query over its sequence's blocks up to its own
position (the chunk's K/V are written first), so one call a layer covers the step and the
context is never gathered. Elsewhere decode rows are gathered into a padded buffer for SDPA and
each chunk is its own SDPA call. ``$INFERCEPT_CPU_ATTENTION`` picks: ``auto`` (default: native
when built and the tensors allow), ``native`` (the same, but an error when not built) or
``torch`` (always the gather path, e.g. to compare).

On CUDA tensors the kernels of :mod:`infercept.model.cuda_kernels` write K/V by slot mapping
and compute attention straight from the blocks. ``$INFERCEPT_CUDA_ATTENTION`` picks ``auto``
(default: the kernels when built and the tensors allow), ``native`` (an error when not built)
or ``torch`` (index_copy + the gather/SDPA path). ``$INFERCEPT_CUDA_PREFILL`` picks the path of
multi-token chunks (prefill, recompute): ``native`` (default: one paged-attention launch per
layer for every row of the step, decode and chunks, causal per row) or ``torch`` (decode rows
native, each chunk gathered from the cache and run through torch SDPA, which can use the
tensor-core flash kernels for long float16/bfloat16 chunks).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from infercept.model import cuda_kernels
from infercept.model.cpu_kernels import (can_run_native_decode, has_native_decode,
                                         paged_decode_attention)

BACKEND_ENV = "INFERCEPT_CPU_ATTENTION"
CUDA_BACKEND_ENV = "INFERCEPT_CUDA_ATTENTION"
CUDA_PREFILL_ENV = "INFERCEPT_CUDA_PREFILL"
_BACKENDS = ("auto", "native", "torch")
_PREFILL_PATHS = ("native", "torch")


@dataclasses.dataclass(frozen=True)
class PagedAttentionMetadata:
    """Where each sequence's tokens sit in the flat batch and in the paged KV cache.

    ``B`` is the number of sequences, ``T`` the number of new tokens in the step.

    Attributes:
        query_start: ``[B + 1]`` int64; sequence ``i``'s new tokens are flat rows
            ``query_start[i]:query_start[i + 1]``.
        context_lens: ``[B]`` int32; tokens with KV after this step (cached + new).
        block_tables: ``[B, max_blocks]`` int32; block ids of each sequence in order, padded
            with 0 past the blocks it uses.
        slot_mapping: ``[T]`` int64; ``block_id * block_size + offset`` where each new token's
            K/V is written.
        positions: ``[T]`` int64 position of each new token: its sequence's cached count plus
            its offset.
        block_size: Tokens per KV block.
        query_lens_host: The ``B`` new-token counts as python ints, so planning needs no
            device-to-host sync.
        context_lens_host: ``context_lens`` as python ints, for the same reason.
    """

    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    positions: torch.Tensor
    block_size: int
    query_lens_host: tuple[int, ...]
    context_lens_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        """Number of sequences ``B``."""
        return len(self.query_lens_host)

    @property
    def num_tokens(self) -> int:
        """Number of new tokens ``T`` in the flat batch."""
        return int(sum(self.query_lens_host))

    @classmethod
    def from_plan(cls, plan: object, block_size: int,
                  device: torch.device | str = "cpu") -> PagedAttentionMetadata:
        """Wraps a StepPlan's flat arrays (built by the core) as tensors.

        On the CPU the tensors share the plan's memory (no copy); on another device each array
        is copied once. ``plan`` must stay alive while they are used (the runner holds it).
        """
        def tensor(array: object) -> torch.Tensor:
            return torch.from_numpy(array).to(device)  # type: ignore[arg-type]

        query_lens = plan.query_lens  # type: ignore[attr-defined]
        context_lens = plan.context_lens  # type: ignore[attr-defined]
        return cls(
            query_start=tensor(plan.query_start),  # type: ignore[attr-defined]
            context_lens=tensor(context_lens),
            block_tables=tensor(plan.block_tables),  # type: ignore[attr-defined]
            slot_mapping=tensor(plan.slot_mapping),  # type: ignore[attr-defined]
            positions=tensor(plan.positions),  # type: ignore[attr-defined]
            block_size=block_size,
            query_lens_host=tuple(query_lens.tolist()),
            context_lens_host=tuple(context_lens.tolist()),
        )

    @classmethod
    def build(cls, query_lens: Sequence[int], context_lens: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int,
              device: torch.device | str = "cpu") -> PagedAttentionMetadata:
        """Builds the record from host lists (tests and the profiler; the engine uses
        :meth:`from_plan`).

        Args:
            query_lens: New tokens per sequence.
            context_lens: Cached + new tokens per sequence.
            block_tables: Block ids per sequence; must cover ``context_lens`` tokens.
            block_size: Tokens per KV block.
            device: Where the tensors live.

        Raises:
            ValueError: The lists disagree in length, a query is longer than its context, or a
                block table is too short for its context.
        """
        num_seqs = len(query_lens)
        if len(context_lens) != num_seqs or len(block_tables) != num_seqs:
            raise ValueError(
                f"got {num_seqs} query_lens, {len(context_lens)} context_lens and "
                f"{len(block_tables)} block_tables; they must have one entry per sequence")
        slots: list[int] = []
        positions: list[int] = []
        for seq, (query_len, context_len, table) in enumerate(
                zip(query_lens, context_lens, block_tables)):
            if not 0 < query_len <= context_len:
                raise ValueError(f"sequence {seq}: query_len={query_len} must be in "
                                 f"1..context_len={context_len}")
            if len(table) * block_size < context_len:
                raise ValueError(f"sequence {seq}: {len(table)} blocks of {block_size} tokens "
                                 f"cannot hold context_len={context_len}")
            for pos in range(context_len - query_len, context_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
                positions.append(pos)
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
        query_start = [0]
        for query_len in query_lens:
            query_start.append(query_start[-1] + query_len)
        return cls(
            query_start=torch.tensor(query_start, dtype=torch.int64, device=device),
            context_lens=torch.tensor(list(context_lens), dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(
                num_seqs, max_blocks),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            block_size=block_size,
            query_lens_host=tuple(int(n) for n in query_lens),
            context_lens_host=tuple(int(n) for n in context_lens),
        )

    def last_token_indices(self) -> torch.Tensor:
        """``[B]`` int64 flat row of each sequence's last new token (the rows that need logits)."""
        return self.query_start[1:] - 1


@dataclasses.dataclass(frozen=True)
class _ChunkPlan:
    """One multi-token sequence chunk: flat rows ``start:start + query_len``."""

    start: int
    query_len: int
    context_len: int
    block_ids: torch.Tensor  # [num_blocks_used] int64
    mask: torch.Tensor | None  # [query_len, context_len] bool (True = attend); None = causal


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Per-step derived index tensors, computed once and shared by every layer.

    On the CPU with the native kernel (``row_block_tables`` set) every flat row, decode or
    chunk, is one query over its sequence's cache up to its own position, so one kernel call
    covers the step and nothing else is built. The torch path's tensors (``decode_rows``,
    ``decode_block_tables``, ``decode_mask``, ``chunks``) are built on first use only: on such
    a step that is only when the kernel cannot take the tensors (not float32).
    """

    metadata: PagedAttentionMetadata
    # CPU native kernel: [T, max_blocks] int32, row r's sequence's block table, and [T] int32,
    # row r's position + 1 (the tokens it sees: the cached ones and the new ones up to itself,
    # all written before the attention). None when the plan is for another path.
    row_block_tables: torch.Tensor | None = None
    row_context_lens: torch.Tensor | None = None
    # CUDA native-kernel inputs, None otherwise: with native_query_start ([B + 1] int32 row
    # offsets, $INFERCEPT_CUDA_PREFILL=native) [B, max_blocks] / [B] over every sequence, one
    # launch for every row; without it [B_dec, ...] over the decode sequences only.
    native_block_tables: torch.Tensor | None = None
    native_context_lens: torch.Tensor | None = None
    native_query_start: torch.Tensor | None = None
    # Every flat row is a decode row, in order: query and output need no gather or scatter.
    decode_only: bool = False

    @functools.cached_property
    def decode_seqs(self) -> list[int]:
        """The single-token sequences, in order."""
        return [i for i, n in enumerate(self.metadata.query_lens_host) if n == 1]

    @functools.cached_property
    def _decode_index(self) -> torch.Tensor:
        return torch.tensor(self.decode_seqs, dtype=torch.int64,
                            device=self.metadata.slot_mapping.device)

    @functools.cached_property
    def decode_rows(self) -> torch.Tensor:
        """``[B_dec]`` int64 flat row of each single-token sequence."""
        return self.metadata.query_start.index_select(0, self._decode_index)

    @functools.cached_property
    def _max_blocks_dec(self) -> int:
        block_size, lens = self.metadata.block_size, self.metadata.context_lens_host
        return max((-(-lens[i] // block_size) for i in self.decode_seqs), default=0)

    @functools.cached_property
    def decode_block_tables(self) -> torch.Tensor:
        """``[B_dec, max_blocks_dec]`` int64 tables of the decode sequences (torch path)."""
        return self.metadata.block_tables.index_select(0, self._decode_index)[
            :, :self._max_blocks_dec].to(torch.int64)

    @functools.cached_property
    def decode_mask(self) -> torch.Tensor:
        """``[B_dec, 1, 1, max_blocks_dec * block_size]`` bool (True = attend), torch path."""
        meta = self.metadata
        context = meta.context_lens.index_select(0, self._decode_index).to(torch.int64)
        key_pos = torch.arange(self._max_blocks_dec * meta.block_size, device=context.device)
        return (key_pos[None, :] < context[:, None])[:, None, None, :]

    @functools.cached_property
    def chunks(self) -> tuple[_ChunkPlan, ...]:
        """The multi-token sequences, each attended by a loop of SDPA calls (torch path)."""
        meta = self.metadata
        device = meta.slot_mapping.device
        chunks = []
        start = 0
        for seq, (query_len, context_len) in enumerate(zip(meta.query_lens_host,
                                                           meta.context_lens_host)):
            if query_len > 1:
                mask = None
                if query_len != context_len:
                    # Query j sits at position context_len - query_len + j, sees keys up to it.
                    query_pos = torch.arange(context_len - query_len, context_len, device=device)
                    mask = torch.arange(context_len, device=device)[None, :] <= query_pos[:, None]
                num_blocks = -(-context_len // meta.block_size)
                chunks.append(_ChunkPlan(
                    start=start, query_len=query_len, context_len=context_len,
                    block_ids=meta.block_tables[seq, :num_blocks].to(torch.int64), mask=mask))
            start += query_len
        return tuple(chunks)


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"${name}={value!r} must be one of {', '.join(choices)}")
    return value


def use_cuda_kernels(device: torch.device) -> bool:
    """Whether CUDA tensors on ``device`` go to the native kernels ($INFERCEPT_CUDA_ATTENTION)."""
    if device.type != "cuda":
        return False
    backend = _env_choice(CUDA_BACKEND_ENV, "auto", _BACKENDS)
    if backend == "native" and not cuda_kernels.has_cuda_kernels():
        raise RuntimeError(f"${CUDA_BACKEND_ENV}=native but infercept._core has no CUDA "
                           "kernels; rebuild with INFERCEPT_CUDA=ON")
    return backend != "torch" and cuda_kernels.has_cuda_kernels()


def _use_native_decode(device: torch.device) -> bool:
    if device.type == "cuda":
        return use_cuda_kernels(device)
    backend = os.environ.get(BACKEND_ENV, "auto")
    if backend not in _BACKENDS:
        raise ValueError(f"${BACKEND_ENV}={backend!r} must be one of {', '.join(_BACKENDS)}")
    if backend == "native" and not has_native_decode():
        raise RuntimeError(f"${BACKEND_ENV}=native but infercept._core has no "
                           "paged_decode_attention; rebuild the package")
    return backend != "torch" and device.type == "cpu" and has_native_decode()


def plan_attention(metadata: PagedAttentionMetadata) -> AttentionPlan:
    """What every layer's :func:`paged_attention` of this step reads, built once per step."""
    device = metadata.slot_mapping.device
    decode_only = max(metadata.query_lens_host, default=1) == 1
    if device.type == "cpu":
        if not _use_native_decode(device):
            return AttentionPlan(metadata, decode_only=decode_only)
        if decode_only:  # one row per sequence: the step's own tables, no copy
            return AttentionPlan(metadata, row_block_tables=metadata.block_tables,
                                 row_context_lens=metadata.context_lens, decode_only=True)
        query_lens = torch.tensor(metadata.query_lens_host, dtype=torch.int64)
        row_seq = torch.repeat_interleave(torch.arange(metadata.num_seqs), query_lens)
        return AttentionPlan(
            metadata, row_block_tables=metadata.block_tables.index_select(0, row_seq),
            row_context_lens=(metadata.positions + 1).to(torch.int32))
    if not use_cuda_kernels(device):
        return AttentionPlan(metadata, decode_only=decode_only)
    if not decode_only and _env_choice(CUDA_PREFILL_ENV, "native", _PREFILL_PATHS) == "native":
        return AttentionPlan(metadata, native_block_tables=metadata.block_tables,
                             native_context_lens=metadata.context_lens,
                             native_query_start=metadata.query_start.to(torch.int32))
    plan = AttentionPlan(metadata, decode_only=decode_only)
    if not plan.decode_seqs:
        return plan
    index = plan._decode_index
    return dataclasses.replace(
        plan, native_block_tables=metadata.block_tables.index_select(0, index),
        native_context_lens=metadata.context_lens.index_select(0, index))


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatters new tokens' K/V ``[T, num_kv_heads, head_dim]`` into their slots of the caches.

    The caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``; slot ``s`` is row ``s`` of
    the cache viewed as ``[num_blocks * block_size, num_kv_heads, head_dim]``.
    """
    if key_cache.is_cuda and use_cuda_kernels(key_cache.device) and key_cache.is_contiguous() \
            and value_cache.is_contiguous():
        cuda_kernels.write_kv_cache(key.contiguous(), value.contiguous(), key_cache, value_cache,
                                    slot_mapping)
        return
    num_kv_heads, head_dim = key_cache.shape[2:]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    key_cache: torch.Tensor, value_cache: torch.Tensor, plan: AttentionPlan,
                    scale: float) -> torch.Tensor:
    """Attention of each new token over its sequence's cached + new K/V.

    The new K/V must already be written to the caches (:func:`write_kv`).

    Args:
        query: ``[T, num_heads, head_dim]`` (RoPE applied).
        key: ``[T, num_kv_heads, head_dim]`` new keys (RoPE applied), used directly for chunks
            with no cached context so a fresh prefill skips the cache gather.
        value: ``[T, num_kv_heads, head_dim]`` new values.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        value_cache: Same shape as ``key_cache``.
        plan: From :func:`plan_attention` for this step.
        scale: Softmax scale, usually ``head_dim ** -0.5``.

    Returns:
        ``[T, num_heads, head_dim]``.
    """
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if plan.row_block_tables is not None and can_run_native_decode(query, key_cache,
                                                                   value_cache):
        # Every row, decode or chunk, over its own cache prefix: causal by the context lengths.
        paged_decode_attention(out, query.contiguous(), key_cache, value_cache,
                               plan.row_block_tables, plan.row_context_lens, scale)
        return out
    num_decode = plan.decode_rows.numel()
    is_cuda_native = (plan.native_block_tables is not None and query.is_cuda
                      and cuda_kernels.can_run_cuda_attention(query, key_cache, value_cache))
    if is_cuda_native and plan.native_query_start is not None:
        # Every row of the step, decode and chunks, in one launch; causal per row.
        cuda_kernels.paged_attention(out, query.contiguous(), key_cache, value_cache,
                                     plan.native_block_tables, plan.native_context_lens, scale,
                                     query_start=plan.native_query_start)
        return out
    # The CUDA decode kernel walks each block table itself: no per-step context copy.
    native_decode = cuda_kernels.paged_attention if is_cuda_native else None
    if num_decode and native_decode is not None:
        if plan.decode_only:
            native_decode(out, query.contiguous(), key_cache, value_cache,
                          plan.native_block_tables, plan.native_context_lens, scale)
        else:
            decode_query = query.index_select(0, plan.decode_rows)
            decode_out = torch.empty_like(decode_query)
            native_decode(decode_out, decode_query, key_cache, value_cache,
                          plan.native_block_tables, plan.native_context_lens, scale)
            out.index_copy_(0, plan.decode_rows, decode_out)
    elif num_decode:
        # Pad every decode sequence to the longest one's blocks and mask the tail: one batched
        # gather + one SDPA instead of a python loop over sequences.
        q = query.index_select(0, plan.decode_rows)  # [B_dec, H, D]
        # GQA without repeating K/V: query heads kv*group..kv*group+group-1 share kv head kv, so
        # they become `group` query rows against that head. [B_dec, H_kv, group, D]
        q = q.view(num_decode, num_kv_heads, group, head_dim)
        # index_select over the flattened tables, not key_cache[tables]: advanced indexing is
        # several times slower on CPU. [B_dec * max_blocks_dec, block, H_kv, D] -> [B_dec, S, ...]
        block_ids = plan.decode_block_tables.flatten()
        k = key_cache.index_select(0, block_ids).view(num_decode, -1, num_kv_heads, head_dim)
        v = value_cache.index_select(0, block_ids).view(num_decode, -1, num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=plan.decode_mask, scale=scale)
        out.index_copy_(0, plan.decode_rows, o.reshape(num_decode, num_heads, head_dim))
    for chunk in plan.chunks:
        rows = slice(chunk.start, chunk.start + chunk.query_len)
        if chunk.mask is None:
            k, v = key[rows], value[rows]  # [L, H_kv, D]: no cached context to gather.
        else:
            # [num_blocks_used, block_size, H_kv, D] -> first context_len token rows.
            k = key_cache.index_select(0, chunk.block_ids).flatten(0, 1)[:chunk.context_len]
            v = value_cache.index_select(0, chunk.block_ids).flatten(0, 1)[:chunk.context_len]
        o = F.scaled_dot_product_attention(
            query[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scale,
            enable_gqa=group > 1)  # [H, L, D]
        out[rows] = o.transpose(0, 1)
    return out
