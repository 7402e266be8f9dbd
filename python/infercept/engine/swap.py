"""The swap engine over a model's paged KV cache: the native copier bound to its tensors.

The native engine (C++, no torch) owns the host pool and a copy worker; this wrapper hands it
the raw addresses of the KV tensors once, checks that their layout is what it assumes, and
turns a step's stats into the stall the scheduler accounts.
"""

from __future__ import annotations

from collections.abc import Sequence

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
            ValueError: The cache tensors are not contiguous CPU tensors (a CUDA cache needs
                the CUDA swap engine), or ``num_host_blocks`` is negative.
        """
        for cache in kv_cache.key_caches + kv_cache.value_caches:
            if not cache.is_contiguous():
                raise ValueError("KV cache tensors must be contiguous for block copies")
            if cache.device.type != "cpu":
                raise ValueError(f"the CPU swap engine cannot copy a KV cache on {cache.device}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks={num_host_blocks} must be >= 0")
        first = kv_cache.key_caches[0]
        block_bytes = first[0].numel() * first.element_size()
        self.num_host_blocks = num_host_blocks
        self._native = _core.CpuSwapEngine(kv_cache.num_layers, block_bytes, kv_cache.num_blocks,
                                          max(num_host_blocks, 1))
        for layer, (key, value) in enumerate(zip(kv_cache.key_caches, kv_cache.value_caches)):
            self._native.register_device_layer(layer, key.data_ptr(), value.data_ptr())
        # The tensors must outlive the native engine's pointers to them.
        self._kv_cache = kv_cache
        self._active = False

    def begin_step(self, swap_out: Sequence[_core.BlockCopy], swap_in: Sequence[_core.BlockCopy]) -> None:
        """Starts a step's copies (device->host ``swap_out``, host->device ``swap_in``)."""
        self._active = bool(swap_out) or bool(swap_in)
        if self._active:
            self._native.begin_step(list(swap_out), list(swap_in))

    def wait_layer(self, layer: int) -> None:
        """Blocks until layer ``layer``'s copies of this step are done."""
        if self._active:
            self._native.wait_layer(layer)

    def finish_step(self) -> float:
        """Waits for every copy of the step; returns the seconds the forward stalled on them."""
        if not self._active:
            return 0.0
        self._active = False
        stats = self._native.finish_step()
        # Waiting per layer during the forward and draining after it both delay the step.
        return stats.stall_s + stats.drain_s

    @property
    def native(self) -> _core.CpuSwapEngine:
        """The native engine (counters, host blocks for tests)."""
        return self._native
