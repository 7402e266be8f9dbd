"""The tensor-parallel executor: the Executor protocol over N ranks, the driver being rank 0.

The engine's process is rank 0: it holds shard 0, runs the one scheduler, samples (its
ModelRunner holds the sampling state, grammars and generators, as with one device) and
spawns ranks 1..N-1 as worker processes (``tp_worker``). Per step:

    driver                                    each worker
    pack the plan's arrays (tp_plan) ---bcast--> unpack
    ModelRunner.execute(plan) on shard 0         run_step: copies + forward, no logits
      (two all-reduces per layer) <------------>   (the same all-reduces)
    max of the ranks' swap stalls <-----max----> its stall

so the plan crosses once per step (one broadcast of a fixed-capacity buffer; a second only
when a plan outgrows it), and the sampled tokens never leave rank 0.

Failure: any error in a step (a worker that died, a collective that timed out, a bug) leaves
the ranks out of step, so the executor fails for good: it stops the workers and raises
:class:`TensorParallelError` naming the worker, its pid and exit code, now and on every later
call. Before each step it checks that every worker is alive; a worker that dies during one
breaks the collective at once (its sockets close), and one that hangs runs into the timeout.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from infercept._core import CostModel, StepPlan, StepResult
from infercept.engine.config import EngineConfig
from infercept.engine.model_runner import ModelRunner
from infercept.engine.tp_group import TensorParallelGroup, connect_store
from infercept.engine.tp_plan import HEADER_LEN, INITIAL_CAPACITY, PROFILE, STOP, header, pack_plan
from infercept.engine.tp_worker import (RankShard, WorkerSpec, grown_capacity, ready_key,
                                        worker_main)
from infercept.model import LlamaForCausalLM
from infercept.model.loader import load_weights
from infercept.model.sharding import check_tensor_parallel_size, shard_config, shard_weights
from infercept.sampling import SamplingParams

logger = logging.getLogger(__name__)


# Workers import torch and load their shard before they answer; on a busy machine that takes
# far longer than a step may.
STARTUP_TIMEOUT_S = 600.0


class TensorParallelError(RuntimeError):
    """The tensor-parallel ranks can no longer run steps together; the engine must be rebuilt."""


def rank_devices(device: torch.device, tensor_parallel_size: int) -> list[torch.device]:
    """Rank r's device: the CPU for all, or ``cuda:(base + r)``.

    Raises:
        ValueError: Fewer than ``tensor_parallel_size`` CUDA devices from ``device`` on.
    """
    if device.type != "cuda":
        return [device] * tensor_parallel_size
    base = device.index or 0
    visible = torch.cuda.device_count()
    if base + tensor_parallel_size > visible:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs CUDA devices "
                         f"cuda:{base}..cuda:{base + tensor_parallel_size - 1}, but only "
                         f"{visible} are visible")
    return [torch.device("cuda", base + r) for r in range(tensor_parallel_size)]


class TensorParallelExecutor:
    """Runs plans over N ranks (the Executor protocol); this process is rank 0.

    Args:
        model_path: The weights, loaded here once; each worker gets its shard in shared memory.
        config: The engine's configuration (``tensor_parallel_size`` >= 2).
        device: Rank 0's device (``select_device(config.device)``).
        model: Already loaded from ``model_path`` (rank 0 shards it instead of loading again;
            a model already packed for oneDNN has no plain weights, so those are loaded again).

    Attributes:
        model_config: The full model's architecture (``model.config`` is shard 0's).
        model, kv_cache, swap_engine: Rank 0's shard, KV cache shard and swap engine.
        num_device_blocks, num_host_blocks: Each rank's KV pools (the scheduler's).

    Raises:
        ValueError: N does not divide the KV heads or the MLP width, or exceeds the devices.
        TensorParallelError: A worker failed to start.
    """

    def __init__(self, model_path: Path, config: EngineConfig, device: torch.device,
                 model: LlamaForCausalLM | None = None,
                 eos_token_ids: Sequence[int] = ()) -> None:
        n = config.tensor_parallel_size
        if model is not None and not model.is_packed:
            model_config = model.config
            weights = {k: v.detach().to("cpu") for k, v in model.hf_state_dict().items()}
        else:
            model_config, weights = load_weights(model_path, config.torch_dtype)
        check_tensor_parallel_size(model_config, n)
        devices = rank_devices(device, n)
        self.model_config = model_config
        self.tensor_parallel_size = n
        local = shard_config(model_config, n)
        self.num_device_blocks, self.num_host_blocks = config.pool_sizes(
            local.kv_bytes_per_token(config.torch_dtype))
        self._error: str | None = None
        self._buffer = torch.empty(INITIAL_CAPACITY, dtype=torch.int64)
        self._stall = torch.zeros(1, dtype=torch.float64)

        timeout_s = config.tensor_parallel_timeout_s
        startup_s = max(timeout_s, STARTUP_TIMEOUT_S)
        store = connect_store("127.0.0.1", 0, 0, n, startup_s)
        context = multiprocessing.get_context("spawn")
        threads = max(1, (os.cpu_count() or 1) // n)
        self._threads_before: int | None = None  # restored by shutdown()
        if devices[0].type == "cpu" and torch.get_num_threads() > threads:
            # N ranks on one CPU share its cores: rank 0 (this process) keeping all of them
            # oversubscribes the CPU, and each all-reduce then waits on a descheduled rank
            # (an N=2 step on 2 cores took 506 ms instead of 32, docs/tensor_parallel.md).
            logger.warning("tensor parallelism on the CPU: torch threads of this process "
                           "%d -> %d (%d cores / %d ranks)", torch.get_num_threads(), threads,
                           os.cpu_count() or 1, n)
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        self._workers = []
        for rank in range(1, n):
            spec = WorkerSpec(model_config, rank, n, store.port, str(devices[rank]),
                              config.dtype, config.block_size, self.num_device_blocks,
                              self.num_host_blocks, timeout_s, startup_s, threads)
            # The shard travels in shared memory (torch's reductions pass storages).
            process = context.Process(target=worker_main,
                                      args=(spec, shard_weights(weights, rank, n)),
                                      daemon=True, name=f"infercept-tp-rank{rank}")
            process.start()
            self._workers.append(process)
        # Stops the workers if the engine is dropped without shutdown().
        self._finalizer = weakref.finalize(self, _stop_processes, list(self._workers))
        try:
            self._wait_loaded(store, time.monotonic() + startup_s)
            self.group = TensorParallelGroup(store, 0, n, devices[0], timeout_s, startup_s)
            self.shard = RankShard(model_config, shard_weights(weights, 0, n), self.group,
                                   config.torch_dtype, config.block_size, self.num_device_blocks,
                                   self.num_host_blocks)
            del weights
            self.shard.barrier()  # every worker has loaded its shard
        except Exception as exc:
            raise self._fail(exc, "at start-up") from exc
        self.model = self.shard.model
        self.kv_cache = self.shard.kv_cache
        self.swap_engine = self.shard.swap_engine
        self.runner = ModelRunner(self.model, self.kv_cache, self.swap_engine, eos_token_ids)

    def _wait_loaded(self, store, deadline: float) -> None:  # noqa: ANN001 - a TCPStore
        """Returns once every worker has loaded its weights; raises if one exits first."""
        waiting = {rank: ready_key(rank) for rank in range(1, self.tensor_parallel_size)}
        while waiting:
            self.check_workers("at start-up")
            waiting = {r: k for r, k in waiting.items() if not store.check([k])}
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(waiting)} did not load their shards in time")
            time.sleep(0.05)

    # ---- the runner's request state (rank 0 samples) ----------------------------------------

    @property
    def grammars(self):  # noqa: ANN201 - GrammarMatchers | None, as ModelRunner's
        return self.runner.grammars

    @grammars.setter
    def grammars(self, value) -> None:  # noqa: ANN001
        self.runner.grammars = value

    @property
    def last_logprobs(self) -> dict:
        """Rank 0's logprobs of the last step's samples, as ModelRunner's."""
        return self.runner.last_logprobs

    def add_request(self, request_id: int, params: SamplingParams,
                    prompt_token_ids: Sequence[int] = ()) -> None:
        """Registers how a request samples (rank 0 alone samples)."""
        self.runner.add_request(request_id, params, prompt_token_ids)

    def take_prompt_logprobs(self, request_id: int) -> list | None:
        """Rank 0's prompt logprobs of a prefilled request, as ModelRunner's."""
        return self.runner.take_prompt_logprobs(request_id)

    def set_params(self, request_id: int, params: SamplingParams,
                   context_token_ids: Sequence[int] = ()) -> None:
        """New sampling for a resumed request."""
        self.runner.set_params(request_id, params, context_token_ids)

    def note_context(self, request_id: int, token_ids: Sequence[int]) -> None:
        """Tokens appended without sampling (a tool's output), for repetition_penalty."""
        self.runner.note_context(request_id, token_ids)

    def remove_request(self, request_id: int) -> None:
        """Forgets a finished or aborted request."""
        self.runner.remove_request(request_id)

    # ---- steps ----------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepResult:
        """Runs one step on every rank; rank 0's samples, the slowest rank's swap stall.

        Raises:
            TensorParallelError: A worker died or hung, or the step failed on rank 0.
        """
        self.check_workers()
        try:
            self._send(pack_plan(plan))
            result = self.runner.execute(plan)
            self._stall[0] = result.swap_stall_s
            self.group.max_(self._stall)
        except Exception as exc:
            raise self._fail(exc, f"at step {plan.step_id}") from exc
        result.swap_stall_s = min(float(self._stall[0]), result.duration_s)
        return result

    def measure_cost_model(self, name: str, kv_capacity_tokens: int) -> CostModel:
        """The profiler's cost model measured on all ranks together (T_fwd of the parallel
        forward; T_swap of the slowest rank)."""
        self.check_workers()
        try:
            self._send(header(PROFILE))
            return self.shard.measure(name, kv_capacity_tokens)
        except Exception as exc:
            raise self._fail(exc, "while measuring the cost model") from exc

    def _send(self, message: np.ndarray) -> None:
        """Broadcasts one message; a plan larger than the buffer grows every rank's first."""
        needed = len(message)
        if needed > len(self._buffer):
            self._buffer[:HEADER_LEN] = torch.from_numpy(message[:HEADER_LEN])
            self.group.broadcast_(self._buffer)
            self._buffer = torch.empty(grown_capacity(len(self._buffer), needed),
                                       dtype=torch.int64)
        self._buffer[:needed] = torch.from_numpy(message)
        self.group.broadcast_(self._buffer)

    # ---- liveness and shutdown -------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1."""
        return [p.pid for p in self._workers]  # type: ignore[misc]

    def check_workers(self, when: str = "between steps") -> None:
        """Raises TensorParallelError if the executor failed or a worker has exited."""
        if self._error is not None:
            raise TensorParallelError(self._error)
        if any(p.exitcode is not None for p in self._workers):
            raise self._fail(None, when)

    def _fail(self, exc: BaseException | None, when: str) -> TensorParallelError:
        """Marks the executor failed, stops the workers, and builds the error to raise."""
        if self._error is None:
            # A dying worker's exit code may lag its broken socket by a moment.
            deadline = time.monotonic() + 2.0
            while (time.monotonic() < deadline
                   and not any(p.exitcode is not None for p in self._workers)):
                time.sleep(0.02)
            dead = [f"rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                    + (f" ({signal.Signals(-p.exitcode).name})" if p.exitcode < 0
                       else " (its traceback is on stderr)")
                    for r, p in enumerate(self._workers, start=1) if p.exitcode is not None]
            cause = "; ".join(dead) if dead else f"{type(exc).__name__}: {exc}"
            self._error = (f"tensor-parallel engine ({self.tensor_parallel_size} ranks) failed "
                           f"{when}: {cause}; the engine cannot run more steps, start a new one")
            _stop_processes(self._workers)
        return TensorParallelError(self._error)

    def shutdown(self) -> None:
        """Stops the workers (a STOP message when they can take it, else terminate)."""
        if self._error is None and all(p.exitcode is None for p in self._workers):
            try:
                self._send(header(STOP))
            except Exception:  # noqa: BLE001 - they are terminated below either way
                pass
            for process in self._workers:
                process.join(timeout=5.0)
        if self._error is None:
            self._error = "the tensor-parallel engine was shut down"
        _stop_processes(self._workers)
        self._finalizer.detach()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None


def _stop_processes(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        if process.exitcode is None:
            process.terminate()
    for process in processes:
        process.join(timeout=5.0)
        if process.exitcode is None:
            process.kill()
            process.join(timeout=5.0)
