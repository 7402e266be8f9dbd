"""The swap engine over a model's paged KV cache: the native copier bound to its tensors.

The native engine (C++, no torch) owns the host pool and a copy worker; this wrapper hands it
the raw addresses of the KV tensors once, checks that their layout is what it assumes, and
turns a step's stats into the stall the scheduler accounts.

A KV cache on CUDA gets ``_core.CudaSwapEngine`` (pinned host pool, two copy streams, one event
per layer and direction); before each step the wrapper hands it torch's current stream, so
``wait_layer(l)`` makes the forward's stream wait for layer ``l``'s swap-in without blocking the
host. A cache on the CPU gets ``_core.CpuSwapEngine``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from infercept import _core
from infercept.model import KVCache


class SwapEngine:
    """Moves KV blocks between the device cache and a host pool, layer by layer.

    Per step: ``begin_step`` starts the plan's copies, the model calls ``wait_layer(l)`` before
    layer ``l``, and ``finish_step`` waits for the rest and returns the stall in seconds.

    Attributes:
        num_host_blocks: Blocks per layer in the host pool.
    """

    def __init__(self, kv_cache: KVCache, num_host_blocks: int) -> None:
        """Allocates the host pool and registers the cache's layers.

        Raises:
            ValueError: The cache tensors are not contiguous, not all on one device, or
                ``num_host_blocks`` is negative.
            RuntimeError: The cache is on CUDA but ``infercept._core`` has no CUDA backend.
        """
        first = kv_cache.key_caches[0]
        self.device = first.device
        for cache in kv_cache.key_caches + kv_cache.value_caches:
            if not cache.is_contiguous():
                raise ValueError("KV cache tensors must be contiguous for block copies")
            if cache.device != self.device:
                raise ValueError(f"KV cache tensors are on {cache.device} and {self.device}; "
                                 "the swap engine serves one device")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"no swap engine copies a KV cache on {self.device}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks={num_host_blocks} must be >= 0")
        block_bytes = first[0].numel() * first.element_size()
        self.num_host_blocks = num_host_blocks
        shape = (kv_cache.num_layers, block_bytes, kv_cache.num_blocks, max(num_host_blocks, 1))
        if self.device.type == "cuda":
            if not hasattr(_core, "CudaSwapEngine"):
                raise RuntimeError("the KV cache is on CUDA but infercept._core was built without "
                                   "the CUDA backend; rebuild with INFERCEPT_CUDA=ON")
            with torch.cuda.device(self.device):
                self._native = _core.CudaSwapEngine(*shape)
        else:
            self._native = _core.CpuSwapEngine(*shape)
        for layer, (key, value) in enumerate(zip(kv_cache.key_caches, kv_cache.value_caches)):
            self._native.register_device_layer(layer, key.data_ptr(), value.data_ptr())
        # The tensors must outlive the native engine's pointers to them.
        self._kv_cache = kv_cache
        self._active = False

    def begin_step(self, swap_out: Sequence[_core.BlockCopy], swap_in: Sequence[_core.BlockCopy]) -> None:
        """Starts a step's copies (device->host ``swap_out``, host->device ``swap_in``)."""
        self._active = bool(swap_out) or bool(swap_in)
        if self._active:
            self._order_after_compute()
            self._native.begin_step(list(swap_out), list(swap_in))

    def begin_plan(self, plan: _core.StepPlan) -> None:
        """``begin_step(plan.swap_out, plan.swap_in)`` with the lists read in the core."""
        self._active = plan.num_swap_out_blocks > 0 or plan.num_swap_in_blocks > 0
        if self._active:
            self._order_after_compute()
            self._native.begin_plan(plan)

    def _order_after_compute(self) -> None:
        if self.device.type == "cuda":
            # Copies are ordered after the work already queued on the forward's stream.
            self._native.set_compute_stream(torch.cuda.current_stream(self.device).cuda_stream)

    def wait_layer(self, layer: int) -> None:
        """Layer ``layer``'s compute waits for its copies: the CPU engine blocks the caller, the
        CUDA engine makes the compute stream wait (no host sync)."""
        if self._active:
            self._native.wait_layer(layer)

    def finish_step(self) -> float:
        """Waits for every copy of the step; returns the seconds the forward stalled on them."""
        if not self._active:
            return 0.0
        self._active = False
        stats = self._native.finish_step()
        # Waiting per layer during the forward and draining after it both delay the step (on
        # CUDA both are device times read off events).
        return stats.stall_s + stats.drain_s

    @property
    def native(self) -> _core.SwapEngine:
        """The native engine (counters, host blocks for tests)."""
        return self._native
