"""The CUDA backend: run-time detection (always), kernels, swap engine and engine (marker ``gpu``).

The ``gpu`` tests skip cleanly without a usable device (CUDA not compiled into ``_core``, no
device, or a torch without CUDA). Kernel references are float64 torch on the same device, with
fresh random inputs per shape and outputs poisoned with NaN before each run.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from fake_dlpack import CPU, CUDA, FakeTensor
from infercept import _core
from infercept.backend import BackendUnavailableError, report, select_device
from infercept.engine.config import EngineConfig
from infercept.model import cuda_kernels
from infercept.policy_names import POLICY_NAMES

HAVE = report()

BATCHES = (1, 3, 7, 33)
CONTEXTS = (1, 15, 16, 17, 1000, 4097)
BLOCK_SIZE = 16
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# --- detection: runs everywhere --------------------------------------------------------------

def test_report_matches_core() -> None:
    assert HAVE.cuda_compiled == bool(_core.cuda_compiled)
    assert HAVE.num_cuda_devices == _core.cuda_device_count()
    assert cuda_kernels.has_cuda_kernels() == bool(_core.cuda_compiled)
    assert hasattr(_core, "CudaSwapEngine") == bool(_core.cuda_compiled)
    assert (HAVE.why_not_cuda() == "") == HAVE.can_use_cuda


def test_select_device_cpu_and_auto_fallback(caplog: pytest.LogCaptureFixture) -> None:
    assert select_device("cpu") == torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="infercept"):
        device = select_device("auto")
    if HAVE.can_use_cuda:
        assert device.type == "cuda"
    else:
        assert device == torch.device("cpu")
        assert "running on CPU" in caplog.text and HAVE.why_not_cuda() in caplog.text


def test_requesting_cuda_without_it_is_a_clear_error() -> None:
    if HAVE.can_use_cuda:
        pytest.skip("CUDA is usable here")
    with pytest.raises(BackendUnavailableError, match="CUDA cannot run"):
        select_device("cuda")
    with pytest.raises(ValueError, match="must be 'auto'"):
        select_device("tpu")


def test_engine_config_validates_device() -> None:
    assert EngineConfig().device == "auto"
    EngineConfig(device="cuda:1")
    with pytest.raises(ValueError, match="device="):
        EngineConfig(device="gpu")


def test_cuda_kernel_wrappers_refuse_cpu_tensors() -> None:
    q = torch.zeros(1, 2, 64)
    cache = torch.zeros(1, BLOCK_SIZE, 1, 64)
    args = (torch.empty_like(q), q, cache, cache, torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), 0.125)
    assert not cuda_kernels.can_run_cuda_attention(q, cache, cache)
    if cuda_kernels.has_cuda_kernels():
        with pytest.raises(ValueError, match="query is on cpu, expected a CUDA device"):
            cuda_kernels.paged_attention(*args)
    else:
        with pytest.raises(RuntimeError, match="INFERCEPT_CUDA=ON"):
            cuda_kernels.paged_attention(*args)


def _cuda_args(**bad: object) -> tuple[object, ...]:
    """(out, query, key_cache, value_cache, block_tables, context_lens, query_start) over fake
    cuda:0 tensors, float16, 4 decode rows, with `bad` replacing some."""
    args = dict(out=FakeTensor((4, 8, 64), torch.float16),
                query=FakeTensor((4, 8, 64), torch.float16),
                key_cache=FakeTensor((9, BLOCK_SIZE, 2, 64), torch.float16),
                value_cache=FakeTensor((9, BLOCK_SIZE, 2, 64), torch.float16),
                block_tables=FakeTensor((4, 3), torch.int32),
                context_lens=FakeTensor((4,), torch.int32), query_start=None)
    return tuple({**args, **bad}.values())


def test_cuda_adapters_reject_bad_tensors_naming_them() -> None:
    """The adapters' checks run before any CUDA call, so they are tested without a device."""
    if not cuda_kernels.has_cuda_kernels():
        pytest.skip("infercept._core was built without CUDA")
    bad_attention = [
        (dict(query=FakeTensor((4, 8, 64), torch.float64)),
         "query is float64, expected float32, float16 or bfloat16"),
        (dict(key_cache=FakeTensor((9, BLOCK_SIZE, 2, 64), torch.float16, device=(CUDA, 1))),
         "key_cache is on cuda:1, expected cuda:0"),
        (dict(value_cache=FakeTensor((9, BLOCK_SIZE, 2, 64), torch.float32)),
         "value_cache is float32, expected float16"),
        (dict(value_cache=FakeTensor((8, BLOCK_SIZE, 2, 64), torch.float16)),
         r"value_cache has shape \[8, 16, 2, 64\], expected \[9, 16, 2, 64\]"),
        (dict(block_tables=FakeTensor((4, 3), torch.int64)),
         "block_tables is int64, expected int32"),
        (dict(context_lens=FakeTensor((4, 1), torch.int32)),
         r"context_lens has shape \[4, 1\], expected \[4\]"),
        (dict(query_start=FakeTensor((4,), torch.int32)),
         r"query_start has shape \[4\], expected \[5\]"),
        (dict(out=FakeTensor((4, 8, 64), torch.float16, strides=(1, 4, 32))),
         r"out with shape \[4, 8, 64\] has strides \[1, 4, 32\], expected contiguous"),
        (dict(out=FakeTensor((4, 8, 64), torch.float16, device=(CPU, 0))),
         "out is on cpu, expected cuda:0"),
        (dict(out=torch.empty(4, 8, 64, dtype=torch.float16)), "out is on cpu, expected cuda:0"),
        (dict(query=FakeTensor((4, 512), torch.float16)),
         r"query has shape \[4, 512\], expected 3"),
    ]
    for bad, message in bad_attention:
        with pytest.raises(ValueError, match="paged_attention: " + message):
            _core.cuda_paged_attention(*_cuda_args(**bad), 0.125, 0)
    query = FakeTensor((4, 8, 64), torch.float16)
    with pytest.raises(ValueError, match="paged_attention: out overlaps query in memory"):
        _core.cuda_paged_attention(*_cuda_args(query=query, out=query), 0.125, 0)

    def kv_write_args(**bad: object) -> tuple[object, ...]:
        args = dict(key=FakeTensor((5, 2, 64), torch.bfloat16),
                    value=FakeTensor((5, 2, 64), torch.bfloat16),
                    key_cache=FakeTensor((9, BLOCK_SIZE, 2, 64), torch.bfloat16),
                    value_cache=FakeTensor((9, BLOCK_SIZE, 2, 64), torch.bfloat16),
                    slot_mapping=FakeTensor((5,), torch.int64))
        return tuple({**args, **bad}.values())

    bad_kv_write = [
        (dict(slot_mapping=FakeTensor((5,), torch.int32)), "slot_mapping is int32, expected int64"),
        (dict(value=FakeTensor((4, 2, 64), torch.bfloat16)),
         r"value has shape \[4, 2, 64\], expected \[5, 2, 64\]"),
        (dict(key=torch.zeros(5, 2, 64, dtype=torch.bfloat16)), "key is on cpu, expected cuda:0"),
        (dict(key_cache=FakeTensor((9, BLOCK_SIZE, 2, 64), torch.int32)),
         "key_cache is int32, expected float32, float16 or bfloat16"),
    ]
    for bad, message in bad_kv_write:
        with pytest.raises(ValueError, match="write_kv_cache: " + message):
            _core.cuda_write_kv_cache(*kv_write_args(**bad), 0)


# --- kernels on the device ---------------------------------------------------------------------

def _gpu_only() -> None:
    if not HAVE.can_use_cuda:
        pytest.skip(f"no usable CUDA: {HAVE.why_not_cuda()}")


def _random_problem(query_lens: list[int], context_lens: list[int], dtype: torch.dtype,
                    head_dim: int, num_heads: int = 8, num_kv_heads: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks)
    tables, start = [], 0
    for n in blocks:
        tables.append(order[start:start + n] + [0] * (max_blocks - n))
        start += n
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    value_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to("cuda", dtype)
    return query, key_cache, value_cache, tables


def _reference(query, key_cache, value_cache, tables, query_lens, context_lens, scale):
    num_heads, head_dim = query.shape[1:]
    group = num_heads // key_cache.shape[2]
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    row = 0
    for table, q_len, ctx in zip(tables, query_lens, context_lens):
        ids = torch.tensor(table, device=query.device)[: -(-ctx // BLOCK_SIZE)]
        k = key_cache.index_select(0, ids).flatten(0, 1)[:ctx].double().repeat_interleave(group, 1)
        v = value_cache.index_select(0, ids).flatten(0, 1)[:ctx].double().repeat_interleave(group, 1)
        q = query[row:row + q_len].double()
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        pos = torch.arange(ctx - q_len, ctx, device=query.device)
        scores.masked_fill_(torch.arange(ctx, device=query.device)[None, :] > pos[:, None], -math.inf)
        out[row:row + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        row += q_len
    return out


def _check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "an output element was not written"
    err = (out.double() - ref).norm() / ref.norm()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} over {TOLERANCE[dtype]:.0e} for {dtype}"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", BATCHES)
def test_decode_attention_matches_reference(batch: int, dtype: torch.dtype, head_dim: int) -> None:
    _gpu_only()
    contexts = [CONTEXTS[(i + batch) % len(CONTEXTS)] for i in range(batch)]
    query, key_cache, value_cache, tables = _random_problem([1] * batch, contexts, dtype, head_dim,
                                                            seed=batch)
    scale = head_dim ** -0.5
    out = torch.full_like(query, math.nan)
    cuda_kernels.paged_attention(out, query, key_cache, value_cache,
                                 torch.tensor(tables, dtype=torch.int32, device="cuda"),
                                 torch.tensor(contexts, dtype=torch.int32, device="cuda"), scale)
    _check_close(out, _reference(query, key_cache, value_cache, tables, [1] * batch, contexts,
                                 scale), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_chunks_are_causal_over_cached_context(dtype: torch.dtype, head_dim: int) -> None:
    _gpu_only()
    query_lens = [1, 15, 16, 17, 5, 1, 33, 3]
    contexts = [1, 15, 16, 17, 17, 1000, 1000, 4097]
    query, key_cache, value_cache, tables = _random_problem(query_lens, contexts, dtype, head_dim)
    starts = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32,
                          device="cuda")
    scale = head_dim ** -0.5
    out = torch.full_like(query, math.nan)
    cuda_kernels.paged_attention(out, query, key_cache, value_cache,
                                 torch.tensor(tables, dtype=torch.int32, device="cuda"),
                                 torch.tensor(contexts, dtype=torch.int32, device="cuda"), scale,
                                 query_start=starts)
    _check_close(out, _reference(query, key_cache, value_cache, tables, query_lens, contexts,
                                 scale), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_write_equals_index_copy(dtype: torch.dtype) -> None:
    _gpu_only()
    gen = torch.Generator().manual_seed(5)
    shape = (9, BLOCK_SIZE, 3, 64)
    key_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    value_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    slots = torch.randperm(9 * BLOCK_SIZE, generator=gen)[:33].to("cuda")
    key = torch.randn(33, 3, 64, generator=gen).to("cuda", dtype)
    value = torch.randn(33, 3, 64, generator=gen).to("cuda", dtype)
    want_k, want_v = key_cache.clone(), value_cache.clone()
    want_k.view(-1, 3, 64).index_copy_(0, slots, key)
    want_v.view(-1, 3, 64).index_copy_(0, slots, value)
    cuda_kernels.write_kv_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, want_k) and torch.equal(value_cache, want_v)


# --- swap engine and engine on the device -------------------------------------------------------

@pytest.mark.gpu
def test_swap_round_trip_is_bit_exact() -> None:
    _gpu_only()
    from infercept.engine.swap import SwapEngine
    from infercept.model import KVCache
    from infercept.model.loader import load_model

    config = load_model(None).config
    cache = KVCache(config, 64, BLOCK_SIZE, torch.float16, "cuda")
    for t in cache.key_caches + cache.value_caches:
        t.copy_(torch.randn(t.shape, device="cuda", dtype=torch.float32).to(t.dtype))
    before = [t.clone() for t in cache.key_caches + cache.value_caches]
    swap = SwapEngine(cache, 32)
    assert isinstance(swap.native, _core.CudaSwapEngine)
    out = [_core.BlockCopy(s, d) for s, d in [(3, 0), (4, 1), (9, 2), (60, 31)]]
    swap.begin_step(out, [])
    swap.finish_step()
    for t in cache.key_caches + cache.value_caches:
        t.fill_(0)
    back = [_core.BlockCopy(c.dst, c.src) for c in out]
    swap.begin_step([], back)
    for layer in range(cache.num_layers):
        swap.wait_layer(layer)
    swap.finish_step()
    torch.cuda.synchronize()
    for got, want in zip(cache.key_caches + cache.value_caches, before):
        for c in out:
            assert torch.equal(got[c.src], want[c.src])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_engine_on_gpu_reproduces_cpu_tokens(policy: str) -> None:
    """SmolLM2 float32, greedy, scripted pauses: the GPU engine (CUDA kernels, CUDA swap engine,
    swaps pipelined per layer) yields the CPU engine's tokens under every policy."""
    _gpu_only()
    from infercept.engine.llm_engine import LLMEngine
    from infercept.sampling import SamplingParams, ScriptedIntercept

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "1, 2, 3, 4,"]
    params = SamplingParams(temperature=0.0, max_tokens=24,
                            intercepts=[ScriptedIntercept(after_tokens=6, duration_s=0.05,
                                                          num_tokens=5)])
    tokens = {}
    for device in ("cpu", "cuda"):
        # A small device pool forces pauses to be swapped / discarded / preserved for real.
        engine = LLMEngine(EngineConfig(policy=policy, device=device, dtype="float32",
                                        num_device_blocks=24, cost_profile="gptj-6b-a100"))
        ids = [engine.add_request(p, params) for p in prompts]
        outs = engine.run_until_done(ids)
        tokens[device] = [o.token_ids for o in outs]
        engine.shutdown()
    assert tokens["cuda"] == tokens["cpu"]
