"""The native CPU paged decode-attention kernel against plain softmax attention in torch, and
its adapter's checks of the tensors it is given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fake_dlpack import CUDA, FakeTensor
from infercept import InvalidArgumentError, _core
from infercept.model import PagedAttentionMetadata
from infercept.model.attention import BACKEND_ENV, paged_attention, plan_attention, write_kv
from infercept.model.cpu_kernels import (has_native_decode, native_decode_body,
                                         paged_decode_attention)

pytestmark = pytest.mark.skipif(not has_native_decode(),
                                reason="infercept._core was built without the CPU kernel")

BLOCK_SIZE = 16


def _problem(batch: int, context_lens: list[int], num_heads: int, num_kv_heads: int,
             head_dim: int, seed: int = 0, spare_blocks: int = 5, block_size: int = BLOCK_SIZE):
    """Random caches and queries; each sequence's blocks are drawn from a shuffled free list."""
    gen = torch.Generator().manual_seed(seed)
    blocks_used = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_used) + spare_blocks
    free = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_used) + 2  # padding columns the kernel must not read
    tables = torch.full((batch, max_blocks), -1, dtype=torch.int32)
    for seq, n in enumerate(blocks_used):
        tables[seq, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen)
    value_cache = torch.randn(shape, generator=gen)
    query = torch.randn(batch, num_heads, head_dim, generator=gen)
    return query, key_cache, value_cache, tables, torch.tensor(context_lens, dtype=torch.int32)


def _decode(query, key_cache, value_cache, tables, context_lens, scale):
    """The kernel's output, written into a NaN-poisoned buffer."""
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(out, query, key_cache, value_cache, tables, context_lens, scale)
    return out


def _reference(query, key_cache, value_cache, tables, context_lens, scale,
               block_size: int = BLOCK_SIZE):
    """Per sequence: gather its context, repeat KV heads for GQA, softmax(q K^T * scale) V."""
    num_heads = query.shape[1]
    group = num_heads // key_cache.shape[2]
    out = torch.empty_like(query)
    for seq, context_len in enumerate(context_lens.tolist()):
        blocks = tables[seq, :-(-context_len // block_size)].long()
        keys = key_cache[blocks].flatten(0, 1)[:context_len].repeat_interleave(group, dim=1)
        values = value_cache[blocks].flatten(0, 1)[:context_len].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,chd->hc", query[seq].double(), keys.double()) * scale
        out[seq] = torch.einsum("hc,chd->hd", scores.softmax(-1), values.double()).float()
    return out


@pytest.mark.parametrize("batch", [1, 3, 7, 33])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_reference_on_awkward_shapes(batch, num_heads, num_kv_heads, head_dim):
    lengths = [1, 15, 16, 17, 100, 1000]
    # Every batch mixes lengths at and around block boundaries.
    context_lens = [lengths[(seq * 5 + batch) % len(lengths)] for seq in range(batch)]
    problem = _problem(batch, context_lens, num_heads, num_kv_heads, head_dim, seed=batch)
    scale = head_dim ** -0.5
    got = _decode(*problem, scale)
    torch.testing.assert_close(got, _reference(*problem, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim,widest", [(64, "avx512"), (128, "avx512"), (40, "avx2"),
                                              (36, "portable")])
def test_body_is_the_widest_the_cpu_has(head_dim, widest):
    """The tests above run whatever body kAuto takes here; this says which, per head_dim."""
    has = {"avx512": _core.cpu_attention_has_avx512(), "avx2": _core.cpu_attention_has_avx2(),
           "portable": True}
    order = ["avx512", "avx2", "portable"]
    want = next(body for body in order[order.index(widest):] if has[body])
    assert native_decode_body(head_dim) == want


@pytest.mark.parametrize("batch", [1, 3, 7, 19])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (3, 3)])
def test_block_boundaries_at_each_block_size(batch, block_size, num_heads, num_kv_heads):
    """Lengths 1, block_size - 1, block_size, block_size + 1 and long, on either block size
    (the AVX-512 body scores sixteen tokens a vector, so 32 is two vectors a block)."""
    lengths = [1, block_size - 1, block_size, block_size + 1, 384]
    context_lens = [lengths[(seq * 3 + batch) % len(lengths)] for seq in range(batch)]
    problem = _problem(batch, context_lens, num_heads, num_kv_heads, 64, seed=batch,
                       block_size=block_size)
    got = _decode(*problem, 0.125)
    want = _reference(*problem, 0.125, block_size=block_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("context_len", [1, 15, 16, 17, 100, 1000])
def test_each_context_length_alone(context_len):
    problem = _problem(1, [context_len], 9, 3, 64, seed=context_len)
    got = _decode(*problem, 0.125)
    torch.testing.assert_close(got, _reference(*problem, 0.125), rtol=1e-5, atol=1e-5)


def test_large_scores_stay_finite():
    """The streaming softmax subtracts the running max, so scores near 1e3 do not overflow."""
    query, key_cache, value_cache, tables, context_lens = _problem(3, [17, 100, 1000], 9, 3, 64)
    query = query * 30.0
    got = _decode(query, key_cache, value_cache, tables, context_lens, 1.0)
    assert torch.isfinite(got).all()
    want = _reference(query, key_cache, value_cache, tables, context_lens, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_empty_batch_is_a_no_op():
    _, key_cache, value_cache, _, _ = _problem(1, [5], 9, 3, 64)
    got = _decode(torch.empty(0, 9, 64), key_cache, value_cache,
                  torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 0.125)
    assert got.shape == (0, 9, 64)


def test_paged_attention_native_matches_torch_path(monkeypatch):
    """Decodes mixed with chunks (one fresh, one over a cached context): the native kernel over
    every row, each chunk token seeing its cache prefix, equals the gather + SDPA path."""
    gen = torch.Generator().manual_seed(1)
    query_lens, cached_lens = [1, 5, 1, 1, 16, 1], [0, 40, 17, 1000, 0, 15]
    num_heads, num_kv_heads, head_dim, num_blocks = 9, 3, 64, 128
    context_lens = [q + c for q, c in zip(query_lens, cached_lens)]
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in context_lens]
    metadata = PagedAttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache, value_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    num_tokens = sum(query_lens)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    write_kv(key, value, key_cache, value_cache, metadata.slot_mapping)

    outputs = {}
    for backend in ("torch", "native"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        plan = plan_attention(metadata)
        assert (plan.row_block_tables is not None) == (backend == "native")
        outputs[backend] = paged_attention(query, key, value, key_cache, value_cache, plan,
                                           head_dim ** -0.5)
    torch.testing.assert_close(outputs["native"], outputs["torch"], rtol=1e-5, atol=1e-5)


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda-please")
    metadata = PagedAttentionMetadata.build([1], [3], [[0]], BLOCK_SIZE)
    with pytest.raises(ValueError, match="INFERCEPT_CPU_ATTENTION='cuda-please'"):
        plan_attention(metadata)


def test_any_dlpack_producer_is_taken():
    """Tensors, numpy arrays and capsules all cross; a capsule is consumed once."""
    problem = _problem(3, [5, 20, 1], 9, 3, 64)
    want = _reference(*problem, 0.125)
    out = torch.empty_like(problem[0])
    _core.paged_decode_attention(out, *problem, 0.125)  # Tensor.__dlpack__
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out_np = np.full(tuple(out.shape), np.nan, dtype=np.float32)
    _core.paged_decode_attention(out_np, *(t.numpy() for t in problem), 0.125)
    np.testing.assert_allclose(out_np, want.numpy(), rtol=1e-5, atol=1e-5)
    capsule = torch.utils.dlpack.to_dlpack(problem[0])
    _core.paged_decode_attention(out, capsule, *problem[1:], 0.125)
    with pytest.raises(ValueError, match='query is not an unused DLPack capsule named "dltensor"'):
        _core.paged_decode_attention(out, capsule, *problem[1:], 0.125)


def test_adapter_rejects_bad_tensors_naming_them():
    query, key_cache, value_cache, tables, context_lens = _problem(2, [5, 20], 9, 3, 64)
    out = torch.empty_like(query)

    def call(**bad):
        args = dict(out=out, query=query, key_cache=key_cache, value_cache=value_cache,
                    block_tables=tables, context_lens=context_lens)
        _core.paged_decode_attention(**{**args, **bad}, scale=1.0)

    prefix = "paged_decode_attention: "
    with pytest.raises(ValueError, match=prefix + "query is float64, expected float32"):
        call(query=query.double())
    with pytest.raises(ValueError, match=prefix + "key_cache is bfloat16, expected float32"):
        call(key_cache=key_cache.bfloat16())
    with pytest.raises(ValueError, match=prefix + "block_tables is int64, expected int32"):
        call(block_tables=tables.long())
    with pytest.raises(ValueError, match=prefix + r"query with shape \[2, 9, 64\] has strides "
                                         r"\[64, 128, 1\], expected contiguous strides "
                                         r"\[576, 64, 1\]"):
        call(query=query.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match=prefix + r"value_cache has shape \[7, 16, 3, 64\], "
                                         r"expected \[8, 16, 3, 64\]"):
        call(value_cache=value_cache[:-1])
    with pytest.raises(ValueError, match=prefix + r"key_cache has shape .*, expected "
                                         r"\[8, 16, 3, 32\]"):
        call(query=query[:, :, :32].contiguous(), out=out[:, :, :32].contiguous())
    with pytest.raises(ValueError, match=prefix + r"out has shape \[2, 9, 63\]"):
        call(out=torch.empty(2, 9, 63))
    with pytest.raises(ValueError, match=prefix + r"query has shape \[2, 576\], expected 3 "
                                         r"dimensions \[num_rows, num_heads, head_dim\]"):
        call(query=query.view(2, -1))
    with pytest.raises(ValueError, match=prefix + r"query has 1 rows, expected one per sequence "
                                         r"of block_tables \(2\)"):
        call(query=query[:1], out=out[:1])
    with pytest.raises(ValueError, match=prefix + "context_lens is on cuda:0, expected cpu"):
        call(context_lens=FakeTensor((2,), torch.int32, device=(CUDA, 0)))
    with pytest.raises(ValueError, match=prefix + "out overlaps query in memory"):
        call(out=query)
    with pytest.raises(ValueError, match="context_lens is a list, expected a tensor"):
        call(context_lens=[5, 20])
    with pytest.raises(ValueError, match="query cannot be exported through DLPack: BufferError"):
        call(query=query.clone().requires_grad_())


def test_kernel_rejects_out_of_range_lengths_and_blocks():
    query, key_cache, value_cache, tables, _ = _problem(2, [5, 20], 9, 3, 64)
    max_context = tables.shape[1] * BLOCK_SIZE
    for bad_len, limit in [(0, "1.."), (max_context + 1, f"1..max_blocks \\* block_size={max_context}")]:
        with pytest.raises(InvalidArgumentError, match=rf"context_lens\[1\]={bad_len} must be in {limit}"):
            _decode(query, key_cache, value_cache, tables,
                    torch.tensor([5, bad_len], dtype=torch.int32), 1.0)
    bad_tables = tables.clone()
    bad_tables[1, 1] = key_cache.shape[0]
    with pytest.raises(ValueError, match=rf"block_tables\[1, 1\]={key_cache.shape[0]} must be in "
                                         rf"\[0, num_blocks={key_cache.shape[0]}\)"):
        _decode(query, key_cache, value_cache, bad_tables,
                torch.tensor([5, 20], dtype=torch.int32), 1.0)


def test_kernel_checks_sizes_the_tensors_carry():
    """Sizes consistent across tensors but outside what the kernel takes fail with the value
    and its limit, before any memory is read."""
    query, key_cache, value_cache, tables, context_lens = _problem(2, [5, 20], 9, 3, 64)
    with pytest.raises(ValueError, match="num_heads=8 must be a multiple of num_kv_heads=3"):
        _decode(query[:, :8].contiguous(), key_cache, value_cache, tables, context_lens, 1.0)
    with pytest.raises(ValueError, match="head_dim=0 must be > 0"):
        _decode(torch.empty(2, 9, 0), torch.empty(8, 16, 3, 0), torch.empty(8, 16, 3, 0),
                tables, context_lens, 1.0)
    with pytest.raises(ValueError, match="scale=inf must be finite"):
        _decode(query, key_cache, value_cache, tables, context_lens, float("inf"))
