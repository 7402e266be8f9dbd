"""One tensor-parallel rank: its weight shard, KV cache shard and swap engine, and the loop that
the worker processes (ranks 1..N-1) run.

Every rank holds the same block ids (the one scheduler's), each over its own KV heads, so a
plan's slot mapping, block tables and block copies mean the same on every rank; the host pool
is per rank too (pinned on CUDA), and each rank's swap engine runs the plan's copies layer by
layer against its own forward. A worker loop:

    broadcast <- STEP message (tp_plan)     (STOP: exit; PROFILE: measure with the driver)
    begin copies, forward (two all-reduces per layer, waits for each layer's copies), no logits
    finish copies; max of the ranks' swap stalls -> the driver

A worker that fails prints its traceback and exits non-zero; the driver sees the exit code and
the broken collective and fails the engine with both.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from collections.abc import Mapping

import numpy as np
import torch

from infercept._core import BlockCopy, CostModel
from infercept.engine.profiler import measure_cost_model
from infercept.engine.swap import SwapEngine
from infercept.engine.tp_group import TensorParallelGroup, connect_store
from infercept.engine.tp_plan import (HEADER_LEN, INITIAL_CAPACITY, PROFILE, STOP, PlanArrays,
                                      unpack_plan)
from infercept.model import KVCache, PagedAttentionMetadata
from infercept.model.config import ModelConfig
from infercept.model.sharding import build_shard
from infercept.process_death import die_with_parent


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is started with, besides its weights (plain data).

    Attributes:
        model_config: The whole model's architecture.
        rank, world_size: The worker's rank (>= 1) and N.
        store_port: The driver's TCP store on 127.0.0.1.
        device: ``'cpu'`` or ``'cuda:K'`` (rank r runs on its own device).
        dtype: Weights and KV cache (an ``EngineConfig.dtype`` name).
        block_size, num_device_blocks, num_host_blocks: The KV pools (the scheduler's).
        timeout_s: Limit of every collective in a step.
        startup_timeout_s: Limit of the rendezvous and of the start-up barrier.
        num_threads: torch CPU threads (the CPU's cores shared among the ranks).
    """

    model_config: ModelConfig
    rank: int
    world_size: int
    store_port: int
    device: str
    dtype: str
    block_size: int
    num_device_blocks: int
    num_host_blocks: int
    timeout_s: float
    startup_timeout_s: float
    num_threads: int


class RankShard:
    """A rank's model shard over its own paged KV cache and swap engine."""

    def __init__(self, config: ModelConfig, shard: Mapping[str, torch.Tensor],
                 group: TensorParallelGroup, dtype: torch.dtype, block_size: int,
                 num_device_blocks: int, num_host_blocks: int) -> None:
        device = group.device
        self.group = group
        self.model = build_shard(config, shard, group.world_size, group.all_reduce_,
                                 dtype).to(device)
        self.model.process_weights_after_loading()
        self.kv_cache = KVCache(self.model.config, num_device_blocks, block_size, dtype, device)
        self.swap_engine = SwapEngine(self.kv_cache, num_host_blocks)

    def run_step(self, plan: PlanArrays) -> float:
        """A worker's step: the copies and the forward, no logits; returns its swap stall (s)."""
        self.swap_engine.begin_step(_copies(plan.swap_out_blocks), _copies(plan.swap_in_blocks))
        try:
            if plan.num_scheduled:
                metadata = PagedAttentionMetadata.from_plan(plan, self.kv_cache.block_size,
                                                            self.group.device)
                ids = torch.from_numpy(plan.input_ids).to(self.group.device)
                no_rows = torch.empty(0, dtype=torch.int64, device=self.group.device)
                self.model(ids, metadata.positions, metadata, self.kv_cache,
                           logits_indices=no_rows, before_layer=self.swap_engine.wait_layer)
        finally:
            stall_s = self.swap_engine.finish_step()
        return stall_s

    def measure(self, name: str, kv_capacity_tokens: int) -> CostModel:
        """The profiler's measurement on this rank, in step with the others: the forwards meet in
        their all-reduces, and T_swap is the slowest rank's (each rank copies its own heads)."""
        return measure_cost_model(self.model, self.kv_cache, self.swap_engine, name,
                                  kv_capacity_tokens, combine_swap_samples=self.max_swap_samples)

    def max_swap_samples(self, samples: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """Each sample's seconds replaced by the largest any rank measured."""
        seconds = torch.tensor([t for _, t in samples], dtype=torch.float64)
        if len(samples):
            self.group.max_(seconds)
        return [(n, float(t)) for (n, _), t in zip(samples, seconds.tolist())]

    def barrier(self) -> None:
        """Returns once every rank has reached it (start-up: every shard loaded)."""
        self.group.max_(torch.zeros(1, dtype=torch.float64), startup=True)


def _copies(blocks: np.ndarray) -> list[BlockCopy]:
    return [BlockCopy(int(src), int(dst)) for src, dst in blocks.tolist()]


def ready_key(rank: int) -> str:
    """The store key a worker sets once its weights are loaded."""
    return f"infercept/ready/{rank}"


def grown_capacity(capacity: int, needed: int) -> int:
    """The plan buffer's next capacity (every rank computes the same from the same header)."""
    while capacity < needed:
        capacity *= 2
    return capacity


def serve(shard: RankShard) -> None:
    """A worker's loop over the driver's messages, until STOP."""
    group = shard.group
    buffer = torch.empty(INITIAL_CAPACITY, dtype=torch.int64)
    stall = torch.zeros(1, dtype=torch.float64)
    while True:
        group.broadcast_(buffer)
        kind, payload_len = int(buffer[0]), int(buffer[1])
        if kind == STOP:
            return
        if kind == PROFILE:
            shard.measure("worker", 1)
            continue
        if HEADER_LEN + payload_len > len(buffer):
            buffer = torch.empty(grown_capacity(len(buffer), HEADER_LEN + payload_len),
                                 dtype=torch.int64)
            group.broadcast_(buffer)
        stall[0] = shard.run_step(unpack_plan(buffer.numpy()))
        group.max_(stall)


def worker_main(spec: WorkerSpec, shard: dict[str, torch.Tensor]) -> None:
    """A worker process's entry point (``multiprocessing`` spawn target).

    ``shard`` is this rank's weights (:func:`~infercept.model.sharding.shard_weights`), in
    shared memory: torch's multiprocessing reductions pass the storages, not copies, so the
    driver loads (and dequantizes) the file once for all ranks.
    """
    from infercept.engine.config import DTYPES

    die_with_parent()  # a driver killed outright takes its workers with it
    try:
        torch.set_num_threads(spec.num_threads)
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = connect_store("127.0.0.1", spec.store_port, spec.rank, spec.world_size,
                              spec.startup_timeout_s)
        # The driver watches for this key and for this process's exit, so a worker that fails
        # to start is reported at once rather than at the rendezvous' timeout; once it is set
        # the driver may drop its references to the shared weights.
        store.set(ready_key(spec.rank), "1")
        group = TensorParallelGroup(store, spec.rank, spec.world_size, device, spec.timeout_s,
                                    spec.startup_timeout_s)
        rank_shard = RankShard(spec.model_config, shard, group, DTYPES[spec.dtype],
                               spec.block_size, spec.num_device_blocks, spec.num_host_blocks)
        del shard
        rank_shard.barrier()
        serve(rank_shard)
    except BaseException:  # noqa: BLE001 - the exit code and the traceback are the report
        print(f"infercept tensor-parallel worker rank {spec.rank} (pid {os.getpid()}) failed:",
              file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
