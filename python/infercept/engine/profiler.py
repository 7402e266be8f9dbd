"""Measures the cost model on this machine: T_fwd over batched tokens and context, T_swap.

Runs before any request exists, on blocks nobody owns yet: decode batches over several
context sizes and prefill chunks of several sizes through the real model, and block round
trips through the real swap engine; then fits the models the scheduler's waste equations read
(DESIGN.md §2):

    T_fwd(n, ctx) = f(n) + attention_s_per_context_token * ctx
    T_swap(n)     = intercept + slope * n

where f interpolates the measured token counts (an affine f, as in the paper, misses a CPU's
steep first few tokens by 20-30%) and the affine fit of f is kept beside it.

and finds the saturation point S on the prefill series: the batched-token count past which
the marginal cost of a token has reached ~90% of the asymptotic slope. The result is cached
as JSON per model, dtype, block size and machine, so later start-ups (and ``infercept
profile``, which writes the same file) read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from infercept._core import AffineFit, BlockCopy, CostModel
from infercept.engine.swap import SwapEngine
from infercept.model import KVCache, LlamaForCausalLM, PagedAttentionMetadata

# Batched-token counts measured: decode batches (one token per sequence) over several context
# sizes, so the attention term separates from the per-token term, and single prefill chunks
# from 1 token up, whose per-token time locates the saturation point.
DECODE_BATCHES = (1, 4, 16)
DECODE_CONTEXTS = (32, 128, 384)
PREFILL_CHUNKS = (1, 8, 32, 64, 128, 256, 512)
SWAP_BLOCKS = (4, 16, 64)
REPEATS = 3
# S is where the marginal cost per batched token reaches this fraction of the asymptotic one.
SATURATION_FRACTION = 0.9
PROFILE_VERSION = 4  # bump when the measurement changes: cached profiles are then re-measured


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


# (num_batched_tokens, num_context_tokens, seconds) of one measured forward.
ForwardSample = tuple[float, float, float]


def _forward_samples(model: LlamaForCausalLM,
                     kv_cache: KVCache) -> tuple[list[ForwardSample], list[ForwardSample]]:
    """Times decode batches over several contexts and prefill chunks; returns (decode, prefill)."""
    block_size = kv_cache.block_size
    device = kv_cache.key_caches[0].device

    def run(query_lens: list[int], context_lens: list[int]) -> None:
        # Sequences take consecutive blocks from 0: nothing owns them before the first request.
        tables, next_block = [], 0
        for context in context_lens:
            num_blocks = -(-context // block_size)
            tables.append(list(range(next_block, next_block + num_blocks)))
            next_block += num_blocks
        metadata = PagedAttentionMetadata.build(query_lens, context_lens, tables, block_size, device)
        ids = torch.zeros(metadata.num_tokens, dtype=torch.int64, device=device)
        model(ids, metadata.positions, metadata, kv_cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the forward is asynchronous on CUDA: time all of it

    def fits(context_lens: list[int]) -> bool:
        return sum(-(-c // block_size) for c in context_lens) <= kv_cache.num_blocks

    decode: list[ForwardSample] = []
    for context in DECODE_CONTEXTS:
        for batch in DECODE_BATCHES:
            if not fits([context] * batch):
                break
            seconds = _best_time_s(lambda: run([1] * batch, [context] * batch))
            decode.append((float(batch), float(batch * context), seconds))
    prefill: list[ForwardSample] = []
    for chunk in PREFILL_CHUNKS:
        if not fits([chunk]):
            break
        seconds = _best_time_s(lambda: run([chunk], [chunk]))
        prefill.append((float(chunk), float(chunk), seconds))
    return decode, prefill


class ForwardFit(NamedTuple):
    """T_fwd as the profile stores it (see :func:`fit_forward`)."""

    affine: AffineFit                    # a + b * tokens, attention removed
    attention_s_per_context_token: float
    points: list[tuple[float, float]]   # (tokens, seconds) per measured count, attention removed


def fit_forward(samples: list[ForwardSample]) -> ForwardFit:
    """Fits T = f(tokens) + c * context: the attention term, f's points and an affine f.

    ``c`` comes from the spread of times among samples with the same token count (decode
    batches over several contexts), so it does not soak up the curvature of f: on a CPU f is
    steep over the first few tokens and shallower after. Without such samples ``c`` is the
    joint least-squares fit of T = a + b * tokens + c * ctx (when the context varies at all).
    ``c`` is clamped at 0. f's points are the mean time per token count less ``c * ctx``, made
    non-decreasing (more tokens never take less time; a dip is noise); the affine fit goes
    through the same corrected samples, for profiles that want a line.

    Raises:
        ValueError: fewer than two distinct token counts.
    """
    if len({n for n, _, _ in samples}) < 2:
        raise ValueError(f"a forward fit needs two or more distinct token counts, got {samples}")
    counts = sorted({n for n, _, _ in samples})
    design = []
    if any(len({ctx for m, ctx, _ in samples if m == n}) >= 2 for n in counts):
        # One intercept per token count, one shared attention slope.
        design = [[1.0 if n == m else 0.0 for m in counts] + [ctx] for n, ctx, _ in samples]
    elif len({ctx / n for n, ctx, _ in samples}) >= 2 and len(samples) >= 3:
        design = [[1.0, n, ctx] for n, ctx, _ in samples]
    attention_s = 0.0
    if design:
        coefficients, *_ = np.linalg.lstsq(np.array(design), np.array([t for _, _, t in samples]), rcond=None)
        attention_s = max(0.0, float(coefficients[-1]))
    corrected = [(n, t - attention_s * ctx) for n, ctx, t in samples]
    points, floor_s = [], 0.0
    for n in counts:
        times = [t for m, t in corrected if m == n]
        floor_s = max(floor_s, sum(times) / len(times))
        points.append((n, floor_s))
    return ForwardFit(AffineFit.fit(corrected), attention_s, points)


def find_saturation_tokens(samples: list[tuple[float, float]],
                           fraction: float = SATURATION_FRACTION) -> int:
    """The batched-token count S past which per-token forward time stops falling.

    The asymptotic marginal cost is the slope between the last two samples; S is the smallest
    measured count whose time per token is within ``1 / fraction`` of it (the marginal cost
    has reached ``fraction`` of the average). On a GPU the forward time is flat up to S and
    linear after, so S is the knee; on a CPU the time is about affine and S is where the fixed
    per-step cost is amortized to ~10% of a token's.

    Args:
        samples: (num_batched_tokens, seconds), attention term already removed.
        fraction: How close the marginal cost must be to the time per token.

    Raises:
        ValueError: fewer than two distinct token counts.
    """
    points = sorted(dict(samples).items())
    if len(points) < 2:
        raise ValueError(f"finding S needs two or more distinct token counts, got {samples}")
    (n_prev, t_prev), (n_last, t_last) = points[-2], points[-1]
    asymptotic = (t_last - t_prev) / (n_last - n_prev)
    if asymptotic <= 0:
        return int(n_last)  # still flat at the largest count measured: S is at least that
    for num_tokens, seconds in points:
        if fraction * seconds / num_tokens <= asymptotic:
            return int(num_tokens)
    return int(n_last)


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
                       name: str, kv_capacity_tokens: int,
                       saturation_tokens: int | None = None,
                       combine_swap_samples: Callable[[list[tuple[float, float]]],
                                                      list[tuple[float, float]]] | None = None,
                       ) -> CostModel:
    """Measures and fits a cost model (tens of seconds on a 2-core CPU for SmolLM2-135M).

    Args:
        model: The model the engine will run.
        kv_cache: Its paged cache; must not yet hold any request's KV. Measurements that do
            not fit in it are skipped.
        swap: The swap engine bound to ``kv_cache``.
        name: Profile name (e.g. the model file's name).
        kv_capacity_tokens: Device KV capacity in tokens (the pool the engine will use).
        saturation_tokens: Token budget S per iteration; None keeps the measured S.
        combine_swap_samples: Maps this process's (tokens, seconds) swap samples to the ones
            the fit uses: under tensor parallelism, the slowest rank's per sample size (every
            rank copies its own heads of the same blocks; the step waits for all of them).
    """
    cost = CostModel()
    cost.name = name
    cost.source = (f"measured on {platform.node() or 'this machine'} "
                   f"({platform.machine()}, {os.cpu_count()} cores, {kv_cache.key_caches[0].device}, "
                   f"torch {torch.__version__})")
    decode, prefill = _forward_samples(model, kv_cache)
    fit = fit_forward(decode + prefill)
    cost.forward, cost.forward_points = fit.affine, fit.points
    cost.attention_s_per_context_token = attention_s = fit.attention_s_per_context_token
    measured_s = find_saturation_tokens([(n, t - attention_s * ctx) for n, ctx, t in prefill or decode])
    swap_samples = _swap_samples(swap, kv_cache, kv_cache.block_size)
    if combine_swap_samples is not None:
        swap_samples = combine_swap_samples(swap_samples)
    if len(swap_samples) >= 2:
        cost.swap = AffineFit.fit(swap_samples)
    cost.kv_bytes_per_token = kv_cache.bytes_per_block // kv_cache.block_size
    cost.kv_capacity_tokens = kv_capacity_tokens
    cost.saturation_tokens = saturation_tokens or measured_s
    return cost


def profile_path(model_name: str, kv_cache: KVCache) -> Path:
    """Where the cached profile of this model on ``kv_cache``'s device and dtype lives."""
    return cache_dir() / profile_key(model_name, kv_cache.key_caches[0].dtype, kv_cache.block_size,
                                     kv_cache.key_caches[0].device.type)


def save_profile(cost: CostModel, path: Path) -> None:
    """Writes ``cost`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    cost.save(str(tmp))
    tmp.replace(path)


def load_or_measure(model: LlamaForCausalLM, kv_cache: KVCache, swap: SwapEngine, model_name: str,
                    kv_capacity_tokens: int, saturation_tokens: int,
                    measure: Callable[[], CostModel] | None = None) -> CostModel:
    """The cached profile for this model and machine, measuring it on the first start-up.

    The pool-dependent fields (capacity, S) are set from this engine's configuration either way.
    ``measure`` replaces :func:`measure_cost_model` on a cache miss (tensor parallelism: every
    rank measures in step).
    """
    path = profile_path(model_name, kv_cache)
    cost = None
    if path.is_file():
        try:
            cost = CostModel.load(str(path))
        except (ValueError, RuntimeError, json.JSONDecodeError):
            cost = None  # a stale or damaged cache is measured again
    if cost is None:
        cost = (measure() if measure is not None else
                measure_cost_model(model, kv_cache, swap, Path(model_name).stem, kv_capacity_tokens))
        save_profile(cost, path)
    cost.kv_capacity_tokens = kv_capacity_tokens
    cost.saturation_tokens = saturation_tokens
    return cost
