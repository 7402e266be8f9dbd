"""`infercept profile`: measure this machine's cost model and write the profile JSON.

The same measurement (``infercept.engine.profiler.measure_cost_model``) runs at engine
start-up when no profile is cached; this command writes to that cache too, so an engine built
afterwards on the same model, dtype, block size and device reads what it measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infercept._core import CostModel
from infercept.backend import select_device
from infercept.engine.config import DTYPES
from infercept.engine.profiler import (cache_dir, measure_cost_model, profile_key, profile_path,
                                      save_profile)
from infercept.engine.swap import SwapEngine
from infercept.model import KVCache, load_model
from infercept.model.loader import resolve_model_path


@dataclass(frozen=True)
class ProfileRequest:
    """What to measure.

    Attributes:
        model: A ``.gguf`` file, an HF directory, or None for the embedded SmolLM2.
        dtype: 'float32', 'bfloat16' or 'float16'.
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        block_size: Tokens per KV block.
        num_device_blocks: Blocks of the scratch KV cache the measurement runs in (enough for
            the largest decode batch and prefill chunk; smaller pools skip what does not fit).
        kv_capacity_tokens: Device KV capacity written into the profile (the pool it
            describes); None: the scratch pool's.
    """

    model: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    block_size: int = 16
    num_device_blocks: int = 400
    kv_capacity_tokens: int | None = None


def measure_profile(request: ProfileRequest, model=None) -> tuple[CostModel, Path]:
    """Measures a profile, writes it to the start-up cache and returns it with the cache path.

    Args:
        request: What to measure.
        model: The already-loaded model of ``request.model`` (saves loading it twice).
    """
    path = resolve_model_path(request.model)
    device = select_device(request.device)
    torch_dtype = DTYPES[request.dtype]
    model = (model or load_model(path, torch_dtype)).to(device)
    model.process_weights_after_loading()
    kv_cache = KVCache(model.config, request.num_device_blocks, request.block_size, torch_dtype, device)
    swap = SwapEngine(kv_cache, request.num_device_blocks)
    capacity = request.kv_capacity_tokens or request.num_device_blocks * request.block_size
    cost = measure_cost_model(model, kv_cache, swap, path.stem, capacity)
    cache_path = profile_path(str(path), kv_cache)
    save_profile(cost, cache_path)
    return cost, cache_path


def describe(cost: CostModel) -> str:
    """A few lines a person can read: the fitted terms and S."""
    fwd, swap = cost.forward, cost.swap
    return "\n".join([
        f"profile {cost.name}: {cost.source}",
        f"  T_fwd(n, ctx) = {1e3 * fwd.intercept_s:.3f} ms + {1e6 * fwd.slope_s_per_token:.2f} us * n"
        f" + {1e9 * cost.attention_s_per_context_token:.2f} ns * ctx   ({len(fwd.samples)} samples)",
        *([f"  T_fwd used: the measured f(n) [ms], interpolated: "
           + ", ".join(f"{n:g}: {1e3 * t:.1f}" for n, t in cost.forward_points)]
          if len(cost.forward_points) >= 2 else []),
        f"  T_swap(n)     = {1e3 * swap.intercept_s:.3f} ms + {1e9 * swap.slope_s_per_token:.2f} ns * n"
        f"   ({len(swap.samples)} samples)",
        f"  saturation point S = {cost.saturation_tokens} batched tokens; "
        f"KV {cost.kv_bytes_per_token} bytes/token; capacity {cost.kv_capacity_tokens} tokens",
    ])


def cached_or_measured(request: ProfileRequest, model=None) -> tuple[CostModel, Path, bool]:
    """The start-up cache's profile for ``request`` if there is one, else a fresh measurement.

    Returns:
        (profile, its cache path, whether it was measured now).
    """
    path = resolve_model_path(request.model)
    device = select_device(request.device)
    cache_path = cache_dir() / profile_key(str(path), DTYPES[request.dtype], request.block_size,
                                           device.type)
    if cache_path.is_file():
        try:
            return CostModel.load(str(cache_path)), cache_path, False
        except (ValueError, RuntimeError):
            pass  # damaged: measure again
    cost, cache_path = measure_profile(request, model)
    return cost, cache_path, True
