"""The step message the driver broadcasts to tensor-parallel workers: one flat int64 buffer.

What a worker needs of a StepPlan is its forward's inputs and its block copies, all integer
arrays (``bindings/step_binding.cpp``); they travel packed end to end after a fixed header, no
pickling. The buffer has a fixed capacity known to every rank, so a step is one broadcast of
``capacity`` int64s; a plan that does not fit says so in its header (``payload_len``), every
rank grows its buffer to the same new capacity, and a second broadcast carries it.

Layout (int64): ``[kind, payload_len, T, B, max_blocks, n_out, n_in, reserved]`` then
``input_ids[T] positions[T] slot_mapping[T] query_start[B+1] query_lens[B] context_lens[B]
block_tables[B*max_blocks] swap_out[n_out*2] swap_in[n_in*2]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from infercept._core import StepPlan

HEADER_LEN = 8
INITIAL_CAPACITY = 4096  # int64s: 32 KiB, a decode batch of 64 with 64-block tables fits

# Message kinds.
STEP = 1
STOP = 2
PROFILE = 3


@dataclasses.dataclass
class PlanArrays:
    """A worker's view of one StepPlan: the arrays ``PagedAttentionMetadata.from_plan`` reads
    (same names and dtypes as StepPlan's) and the block copies as ``[N, 2]`` int32 arrays."""

    input_ids: np.ndarray      # [T] int64
    positions: np.ndarray      # [T] int64
    slot_mapping: np.ndarray   # [T] int64
    query_start: np.ndarray    # [B + 1] int64
    query_lens: np.ndarray     # [B] int32
    context_lens: np.ndarray   # [B] int32
    block_tables: np.ndarray   # [B, max_blocks] int32
    swap_out_blocks: np.ndarray  # [n_out, 2] int32 (device src, host dst)
    swap_in_blocks: np.ndarray   # [n_in, 2] int32 (host src, device dst)

    @property
    def num_scheduled(self) -> int:
        """B, requests in the forward."""
        return len(self.query_lens)


def header(kind: int, payload_len: int = 0) -> np.ndarray:
    """A message with no payload (STOP, PROFILE)."""
    out = np.zeros(HEADER_LEN, dtype=np.int64)
    out[0], out[1] = kind, payload_len
    return out


def pack_plan(plan: StepPlan) -> np.ndarray:
    """``[HEADER_LEN + payload_len]`` int64: the STEP message of ``plan``."""
    block_tables = plan.block_tables
    parts = [plan.input_ids, plan.positions, plan.slot_mapping, plan.query_start, plan.query_lens,
             plan.context_lens, block_tables.reshape(-1), plan.swap_out_blocks.reshape(-1),
             plan.swap_in_blocks.reshape(-1)]
    payload_len = sum(len(p) for p in parts)
    out = np.empty(HEADER_LEN + payload_len, dtype=np.int64)
    out[:HEADER_LEN] = (STEP, payload_len, len(plan.input_ids), len(plan.query_lens),
                        block_tables.shape[1], plan.num_swap_out_blocks, plan.num_swap_in_blocks, 0)
    np.concatenate(parts, out=out[HEADER_LEN:], casting="same_kind")
    return out


def unpack_plan(message: np.ndarray) -> PlanArrays:
    """The arrays of a STEP message (views and small casts of ``message``)."""
    _, _, t, b, max_blocks, n_out, n_in, _ = (int(v) for v in message[:HEADER_LEN])
    sizes = [t, t, t, b + 1, b, b, b * max_blocks, 2 * n_out, 2 * n_in]
    offsets = np.cumsum([HEADER_LEN] + sizes)
    arrays = [message[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
    return PlanArrays(
        input_ids=arrays[0], positions=arrays[1], slot_mapping=arrays[2], query_start=arrays[3],
        query_lens=arrays[4].astype(np.int32), context_lens=arrays[5].astype(np.int32),
        block_tables=arrays[6].astype(np.int32).reshape(b, max_blocks),
        swap_out_blocks=arrays[7].astype(np.int32).reshape(n_out, 2),
        swap_in_blocks=arrays[8].astype(np.int32).reshape(n_in, 2))
