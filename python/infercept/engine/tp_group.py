"""The collectives of one tensor-parallel engine, and the time spent in them.

Two process groups over one TCP store, as vLLM keeps a CPU group beside the device group:

- ``plan``: gloo, CPU tensors: the driver's broadcast of each step's plan (and the step's
  closing max of the swap stalls), whatever the device.
- ``activations``: the all-reduce of o_proj and down_proj outputs: gloo on the CPU, NCCL on
  CUDA.

The groups are built directly (``ProcessGroupGloo(store, ...)``), not through
``init_process_group``: the process's default group stays free, and two engines in one process
(tests) never share a group. Every collective has the group's timeout, so a rank that stops
answering raises instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime
import time

import torch
import torch.distributed as dist


@dataclasses.dataclass
class CommStats:
    """Seconds and calls spent in collectives on this rank since the last ``reset``.

    The time of a collective includes waiting for the slowest rank to reach it.
    """

    all_reduce_s: float = 0.0
    num_all_reduces: int = 0
    broadcast_s: float = 0.0
    num_broadcasts: int = 0
    broadcast_bytes: int = 0
    max_s: float = 0.0   # the step's closing max of swap stalls (and start-up barriers)
    num_maxes: int = 0

    def reset(self) -> None:
        """Zeros the counters."""
        self.__init__()  # type: ignore[misc]


def connect_store(host: str, port: int, rank: int, world_size: int,
                  timeout_s: float) -> dist.TCPStore:
    """The engine's rendezvous: rank 0 serves it (``port=0`` picks a free port, read back from
    ``store.port``), the workers connect to it."""
    return dist.TCPStore(host, port, world_size, is_master=rank == 0,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class TensorParallelGroup:
    """Rank ``rank`` of ``world_size`` in one engine's groups.

    Args:
        store: The engine's TCP store (:func:`connect_store`).
        rank, world_size: This process's rank and the group size.
        device: Where activations live (CPU: gloo all-reduce; CUDA: NCCL).
        timeout_s: How long any collective (and the rendezvous) may wait for the other ranks.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, device: torch.device,
                 timeout_s: float, startup_timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.startup_timeout = datetime.timedelta(seconds=max(timeout_s, startup_timeout_s))
        self.stats = CommStats()
        self._store = store
        # The groups' own timeout covers the rendezvous (workers still importing and loading);
        # every collective passes the step timeout.
        self.plan_group = dist.ProcessGroupGloo(dist.PrefixStore("plan", store), rank,
                                                world_size, self.startup_timeout)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.startup_timeout
            self.activation_group = dist.ProcessGroupNCCL(
                dist.PrefixStore("activations", store), rank, world_size, options)
        else:
            self.activation_group = dist.ProcessGroupGloo(
                dist.PrefixStore("activations", store), rank, world_size, self.startup_timeout)

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """Sums ``tensor`` across ranks in place (the row-parallel layers' partial sums)."""
        start = time.perf_counter()
        opts = dist.AllreduceOptions()
        opts.timeout = self.timeout
        self.activation_group.allreduce([tensor], opts).wait(self.timeout)
        self.stats.all_reduce_s += time.perf_counter() - start
        self.stats.num_all_reduces += 1

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Overwrites a CPU ``tensor`` with rank 0's on every rank."""
        start = time.perf_counter()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = self.timeout
        self.plan_group.broadcast([tensor], opts).wait(self.timeout)
        self.stats.broadcast_s += time.perf_counter() - start
        self.stats.num_broadcasts += 1
        self.stats.broadcast_bytes += tensor.numel() * tensor.element_size()

    def max_(self, tensor: torch.Tensor, startup: bool = False) -> None:
        """Element-wise max of a CPU ``tensor`` across ranks, in place (stalls, swap timings).

        ``startup``: wait as long as the rendezvous may (the start-up barrier: shards loading).
        """
        timeout = self.startup_timeout if startup else self.timeout
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        opts.timeout = timeout
        start = time.perf_counter()
        self.plan_group.allreduce([tensor], opts).wait(timeout)
        self.stats.max_s += time.perf_counter() - start
        self.stats.num_maxes += 1
