"""CpuSwapEngine over real paged KV tensors: bit-exact round trips, bad input, the step protocol."""

from __future__ import annotations

import pytest
import torch

from infercept import _core
from infercept.model.config import ModelConfig
from infercept.model.paged_cache import KVCache

# A small Llama-shaped model: 3 layers, 2 KV heads of 8 dims.
CONFIG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=8)
BLOCK_SIZE = 4
NUM_DEVICE_BLOCKS = 10
NUM_HOST_BLOCKS = 6


def make_engine(cache: KVCache, num_host_blocks: int = NUM_HOST_BLOCKS) -> _core.CpuSwapEngine:
    """An engine serving every layer of ``cache``; block_bytes is one block of one K tensor."""
    key = cache.key_caches[0]
    engine = _core.CpuSwapEngine(cache.num_layers, key[0].numel() * key.element_size(),
                                 cache.num_blocks, num_host_blocks)
    for layer, (k, v) in enumerate(zip(cache.key_caches, cache.value_caches)):
        assert k.is_contiguous() and v.is_contiguous()
        engine.register_device_layer(layer, k.data_ptr(), v.data_ptr())
    return engine


def random_cache(dtype: torch.dtype, seed: int) -> KVCache:
    cache = KVCache(CONFIG, NUM_DEVICE_BLOCKS, BLOCK_SIZE, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    for tensor in cache.key_caches + cache.value_caches:
        tensor.copy_(torch.randn(tensor.shape, generator=generator).to(dtype))
    return cache


def run_step(engine: _core.SwapEngine, swap_out, swap_in) -> _core.SwapStepStats:
    engine.begin_step(swap_out, swap_in)
    for layer in range(engine.num_layers):
        engine.wait_layer(layer)
    return engine.finish_step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_into_other_blocks_is_bit_exact(dtype: torch.dtype) -> None:
    cache = random_cache(dtype, seed=1)
    original = [t.clone() for t in cache.key_caches + cache.value_caches]
    engine = make_engine(cache)

    sources = [2, 3, 4, 8]
    swap_out = [_core.BlockCopy(src, dst) for dst, src in enumerate(sources)]
    stats = run_step(engine, swap_out, [])
    assert stats.num_blocks_out == 4
    assert stats.num_bytes == 4 * cache.bytes_per_block
    # The host pool holds the bytes of the device blocks, K and V of every layer.
    for layer, key in enumerate(cache.key_caches):
        expected = key[8].contiguous().view(torch.uint8).numpy().tobytes()
        assert engine.host_block(layer, False, 3) == expected

    for tensor in cache.key_caches + cache.value_caches:
        tensor[sources] = 0
    targets = [9, 0, 5, 1]  # other blocks, another order
    stats = run_step(engine, [], [(host, dst) for host, dst in enumerate(targets)])
    assert stats.num_blocks_in == 4

    for tensor, before in zip(cache.key_caches + cache.value_caches, original):
        assert torch.equal(tensor[targets], before[sources])
        untouched = [b for b in range(NUM_DEVICE_BLOCKS) if b not in sources + targets]
        assert torch.equal(tensor[untouched], before[untouched])
    counters = engine.counters
    assert (counters.num_blocks_out, counters.num_blocks_in) == (4, 4)
    assert counters.num_bytes_out == counters.num_bytes_in == 4 * cache.bytes_per_block


def test_swaps_of_a_scheduler_plan_are_accepted_as_is() -> None:
    # The copy lists of a StepPlan are BlockCopy objects; the engine takes them unchanged.
    cache = random_cache(torch.float32, seed=2)
    engine = make_engine(cache)
    copies = [_core.BlockCopy(src=7, dst=0), _core.BlockCopy(src=6, dst=1)]
    before = cache.value_caches[1][[7, 6]].clone()
    run_step(engine, copies, [])
    cache.value_caches[1].zero_()
    run_step(engine, [], [_core.BlockCopy(src=0, dst=7), _core.BlockCopy(src=1, dst=6)])
    assert torch.equal(cache.value_caches[1][[7, 6]], before)


def test_bad_ids_raise_value_error_naming_the_id_and_the_limit() -> None:
    cache = random_cache(torch.float32, seed=3)
    engine = make_engine(cache)
    with pytest.raises(ValueError, match=r"swap_out\[1\]\.src=10 is not a device block: "
                                         r"the device pool holds blocks 0\.\.9"):
        engine.begin_step([(0, 0), (10, 1)], [])
    with pytest.raises(ValueError, match=r"swap_in\[0\]\.src=6 is not a host block: "
                                         r"the host pool holds blocks 0\.\.5"):
        engine.begin_step([], [(6, 0)])
    with pytest.raises(_core.InvalidArgumentError, match=r"swap_in\[0\]\.dst=-1"):
        engine.begin_step([], [(0, -1)])
    with pytest.raises(ValueError, match="swap_out writes block 2 twice"):
        engine.begin_step([(0, 2), (1, 2)], [])
    with pytest.raises(ValueError, match=r"layer=3 is out of range: the engine has layers 0\.\.2"):
        engine.wait_layer(3)
    with pytest.raises(ValueError, match=r"block=6 is not a host block"):
        engine.host_block(0, True, 6)
    with pytest.raises(TypeError, match=r"swap_out\[0\] must be a BlockCopy or a \(src, dst\) pair"):
        engine.begin_step(["0,1"], [])
    assert not engine.is_step_in_flight
    assert engine.counters.num_blocks_out == 0


def test_step_protocol() -> None:
    cache = random_cache(torch.float32, seed=4)
    engine = _core.CpuSwapEngine(cache.num_layers, 128, NUM_DEVICE_BLOCKS, NUM_HOST_BLOCKS)
    # An empty step needs no registered layers and completes at once.
    stats = run_step(engine, [], [])
    assert stats.num_bytes == 0 and stats.copy_s == 0.0
    with pytest.raises(_core.StateError, match="device layer 0 is not registered"):
        engine.begin_step([(0, 0)], [])
    with pytest.raises(ValueError, match="null key pointer"):
        engine.register_device_layer(0, 0, cache.value_caches[0].data_ptr())
    engine = make_engine(cache)
    engine.begin_step([(0, 0)], [])
    assert engine.is_step_in_flight
    with pytest.raises(_core.StateError, match="call finish_step"):
        engine.begin_step([], [])
    engine.finish_step()
    assert not engine.is_step_in_flight
    with pytest.raises(ValueError, match="num_host_blocks=0 must be > 0"):
        _core.CpuSwapEngine(1, 64, 1, 0)
