"""The native CPU layer ops against the torch code they replace (model/llama.py's fallback):
rms_norm and the fused residual add against F.rms_norm, rotary_write_kv against apply_rope +
write_kv, bit for bit where the arithmetic is the same op by op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infercept.model import cpu_kernels
from infercept.model.attention import write_kv
from infercept.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.skipif(not cpu_kernels.has_native_layer_ops(),
                                reason="infercept._core without the CPU layer ops")


@pytest.mark.parametrize("rows,hidden", [(1, 576), (3, 5), (19, 64), (300, 576)])
def test_rms_norm_and_add_rms_norm_match_torch(rows, hidden):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=g)
    residual = torch.randn(rows, hidden, generator=g)
    weight = torch.randn(hidden, generator=g)
    out = torch.empty_like(x)
    cpu_kernels.rms_norm(out, x, weight, 1e-5)
    torch.testing.assert_close(out, F.rms_norm(x, (hidden,), weight, 1e-5), rtol=1e-5, atol=1e-6)

    want_sum = residual + x
    want_norm = F.rms_norm(want_sum, (hidden,), weight, 1e-5)
    cpu_kernels.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual, want_sum)
    torch.testing.assert_close(x, want_norm, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 9, 3, 64), (7, 9, 3, 64),
                                                            (130, 4, 2, 128), (3, 2, 2, 2)])
def test_rotary_write_kv_equals_apply_rope_then_write_kv(tokens, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(tokens)
    num_blocks, block_size = 12, 16
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=g)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(head_dim, 10000.0, None), torch.float32)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim) for _ in range(4)]

    qk = apply_rope(qkv[:, :heads + kv_heads], cos, sin)
    write_kv(qk[:, heads:], qkv[:, heads + kv_heads:], caches[0], caches[1], slots)
    ours = qkv.clone()
    cpu_kernels.rotary_write_kv(ours, cos, sin, caches[2], caches[3], slots)
    assert torch.equal(ours[:, :heads + kv_heads], qk)
    assert torch.equal(ours[:, heads + kv_heads:], qkv[:, heads + kv_heads:])
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


@pytest.mark.parametrize("rows,intermediate", [(1, 1536), (5, 7), (64, 1536)])
def test_silu_mul_matches_torch(rows, intermediate):
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * intermediate, generator=g) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # e^-g clamped at both ends
    gate, up = gate_up.split(intermediate, dim=-1)
    want = F.silu(gate) * up
    ours = gate_up.clone()
    cpu_kernels.silu_mul(ours)
    torch.testing.assert_close(ours[:, :intermediate], want, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours[:, intermediate:], up)


def test_bad_tensors_raise_naming_them_and_write_nothing():
    qkv = torch.randn(2, 5, 4)
    cos = sin = torch.ones(2, 4)
    key_cache, value_cache = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4)
    before = qkv.clone()
    with pytest.raises(ValueError, match=r"slot_mapping\[1\]=2 must be in \[0, num_slots=2\)"):
        cpu_kernels.rotary_write_kv(qkv, cos, sin, key_cache, value_cache, torch.tensor([0, 2]))
    assert torch.equal(qkv, before) and not key_cache.any()
    with pytest.raises(ValueError, match="slot_mapping"):
        cpu_kernels.rotary_write_kv(qkv, cos, sin, key_cache, value_cache,
                                    torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="weight"):
        cpu_kernels.rms_norm(torch.empty(2, 4), torch.randn(2, 4), torch.ones(3), 1e-5)
    with pytest.raises(ValueError, match="gate_up has 5 columns"):
        cpu_kernels.silu_mul(torch.randn(2, 5))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="residual"):
        cpu_kernels.add_rms_norm(x, x, torch.ones(4), 1e-5)
