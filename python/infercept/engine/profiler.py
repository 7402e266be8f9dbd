"""Measures the cost model on this machine: T_fwd over batched tokens, T_swap over blocks.

Runs before any request exists, on blocks nobody owns yet: a few decode batches and prefill
chunks through the real model, and block round trips through the real swap engine; then
fits the affine models the scheduler's waste equations read (DESIGN.md §2). The result is
cached as JSON per model, dtype, block size and machine, so later start-ups read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from infercept._core import AffineFit, BlockCopy, CostModel
from infercept.engine.swap import SwapEngine
from infercept.model import KVCache, LlamaForCausalLM, PagedAttentionMetadata

# Batched-token counts measured: decode batches (one token per sequence over a short context)
# and single prefill chunks, so the fit covers what the scheduler mixes into a step.
DECODE_BATCHES = (1, 4, 16, 32)
DECODE_CONTEXT = 64
PREFILL_CHUNKS = (64, 256, 512)
SWAP_BLOCKS = (4, 16, 64)
REPEATS = 3
PROFILE_VERSION = 2  # bump when the measurement changes: cached profiles are then re-measured


def cache_dir() -> Path:
    """Where measured profiles are kept (``$INFERCEPT_CACHE`` or ``~/.cache/infercept``)."""
    root = os.environ.get("INFERCEPT_CACHE") or Path.home() / ".cache" / "infercept"
    return Path(root) / "profiles"


def profile_key(model_name: str, dtype: torch.dtype, block_size: int, device: str) -> str:
    """A file name that changes with anything the timings depend on."""
    machine = f"{platform.machine()}-{platform.processor()}-{os.cpu_count()}-{torch.get_num_threads()}"
    digest = hashlib.sha1(f"{PROFILE_VERSION}|{model_name}|{dtype}|{block_size}|{device}|{machine}|{torch.__version__}"
                          .encode()).hexdigest()[:12]
    return f"{Path(model_name).stem}-{str(dtype).removeprefix('torch.')}-{device}-{digest}.json"


def _best_time_s(fn: Callable[[], None]) -> float:
    """The fastest of a few runs: the least disturbed by whatever else shares the machine."""
    fn()  # warm-up: first calls allocate and pick kernels
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def _forward_samples(model: LlamaForCausalLM, kv_cache: KVCache) -> list[tuple[float, float]]:
    block_size = kv_cache.block_size
    device = kv_cache.key_caches[0].device
    samples = []

    def run(query_lens: list[int], context_lens: list[int]) -> None:
        # Sequences take consecutive blocks from 0: nothing owns them before the first request.
        tables, next_block = [], 0
        for context in context_lens:
            num_blocks = -(-context // block_size)
            tables.append(list(range(next_block, next_block + num_blocks)))
            next_block += num_blocks
        metadata = PagedAttentionMetadata.build(query_lens, context_lens, tables, block_size, device)
        ids = torch.zeros(metadata.num_tokens, dtype=torch.int64, device=device)
        model(ids, metadata.positions(), metadata, kv_cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the forward is asynchronous on CUDA: time all of it

    blocks_per_decode = -(-DECODE_CONTEXT // block_size)
    for batch in DECODE_BATCHES:
        if batch * blocks_per_decode > kv_cache.num_blocks:
            break
        seconds = _best_time_s(lambda: run([1] * batch, [DECODE_CONTEXT] * batch))
        samples.append((float(batch), seconds))
    for chunk in PREFILL_CHUNKS:
        if -(-chunk // block_size) > kv_cache.num_blocks:
            break
        seconds = _best_time_s(lambda: run([chunk], [chunk]))
        samples.append((float(chunk), seconds))
    return samples


def _swap_samples(swap: SwapEngine, kv_cache: KVCache, block_size: int) -> list[tuple[float, float]]:
    samples = []
    for num_blocks in SWAP_BLOCKS:
        if num_blocks > min(kv_cache.num_blocks, swap.num_host_blocks):
            break
        out = [BlockCopy(b, b) for b in range(num_blocks)]

        def round_trip() -> None:
            swap.begin_step(out, [])
            swap.finish_step()
            swap.begin_step([], out)
            swap.finish_step()

        # Half a round trip is one direction's time for num_blocks * block_size tokens.
        samples.append((float(num_blocks * block_size), _best_time_s(round_trip) / 2))
    return samples


def measure_cost_model(model: LlamaForCausalLM, kv_cache: KVCache, swap: SwapEngine,
                       name: str, kv_capacity_tokens: int, saturation_tokens: int) -> CostModel:
    """Measures and fits a cost model (a few seconds on a 2-core CPU for SmolLM2-135M).

    Args:
        model: The model the engine will run.
        kv_cache: Its paged cache; must not yet hold any request's KV.
        swap: The swap engine bound to ``kv_cache``.
        name: Profile name (e.g. the model file's name).
        kv_capacity_tokens: Device KV capacity in tokens (the pool the engine will use).
        saturation_tokens: Token budget S per iteration.
    """
    cost = CostModel()
    cost.name = name
    cost.source = (f"measured at start-up on {platform.node() or 'this machine'} "
                   f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__})")
    cost.forward = AffineFit.fit(_forward_samples(model, kv_cache))
    swap_samples = _swap_samples(swap, kv_cache, kv_cache.block_size)
    if len(swap_samples) >= 2:
        cost.swap = AffineFit.fit(swap_samples)
    cost.kv_bytes_per_token = kv_cache.bytes_per_block // kv_cache.block_size
    cost.kv_capacity_tokens = kv_capacity_tokens
    cost.saturation_tokens = saturation_tokens
    return cost


def load_or_measure(model: LlamaForCausalLM, kv_cache: KVCache, swap: SwapEngine, model_name: str,
                    kv_capacity_tokens: int, saturation_tokens: int) -> CostModel:
    """The cached profile for this model and machine, measuring it on the first start-up.

    The pool-dependent fields (capacity, S) are set from this engine's configuration either way.
    """
    device = kv_cache.key_caches[0].device.type
    path = cache_dir() / profile_key(model_name, kv_cache.key_caches[0].dtype, kv_cache.block_size,
                                     device)
    cost = None
    if path.is_file():
        try:
            cost = CostModel.load(str(path))
        except (ValueError, RuntimeError, json.JSONDecodeError):
            cost = None  # a stale or damaged cache is measured again
    if cost is None:
        cost = measure_cost_model(model, kv_cache, swap, Path(model_name).stem, kv_capacity_tokens,
                                  saturation_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        cost.save(str(tmp))
        tmp.replace(path)
    cost.kv_capacity_tokens = kv_capacity_tokens
    cost.saturation_tokens = saturation_tokens
    return cost
