"""The packed CPU Linear (native kernel and oneDNN) against F.linear, the choice of path, and
the stacked projections against HF names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infercept.model import cpu_kernels
from infercept.model.linear import CPU_LINEAR_ENV, Linear, _has_onednn_linear, packing_for

PACKINGS = [pytest.param("native", marks=pytest.mark.skipif(
                not cpu_kernels.has_native_linear(), reason="the core has no cpu_linear")),
            pytest.param("onednn", marks=pytest.mark.skipif(
                not _has_onednn_linear(), reason="torch has no oneDNN linear here"))]


def _linear(out_features: int, in_features: int, bias: bool) -> tuple[Linear, torch.Tensor]:
    layer = Linear(in_features, out_features, bias=bias)
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    layer.weight.data.copy_(weight)
    if bias:
        layer.bias.data.normal_(generator=generator)
    return layer, weight


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_f_linear(monkeypatch: pytest.MonkeyPatch, packing: str, rows: int,
                                bias: bool) -> None:
    monkeypatch.setenv(CPU_LINEAR_ENV, packing)
    layer, weight = _linear(960, 576, bias)
    x = torch.randn(rows, 576)
    want = F.linear(x, weight, layer.bias)
    assert layer.pack() and layer.is_packed and layer.weight is None
    assert layer.packing == packing
    assert layer.pack()  # idempotent
    with torch.inference_mode():
        got = layer(x)
        # Rows of a wider tensor (the gate half of gate_up, say) are read through their stride.
        strided = layer(torch.cat([x, x], dim=1)[:, :576])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(strided, want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not cpu_kernels.has_native_linear(), reason="the core has no cpu_linear")
@pytest.mark.parametrize("rows", [1, 3, 19, 33])
@pytest.mark.parametrize("out_features,in_features", [(5, 1), (17, 7), (49, 64), (576, 1536)])
def test_native_awkward_shapes_equal_f_linear(monkeypatch: pytest.MonkeyPatch, rows: int,
                                              out_features: int, in_features: int) -> None:
    """N not a multiple of 16 (a padded last panel), tiny K, 3-D input, a bias."""
    monkeypatch.setenv(CPU_LINEAR_ENV, "native")
    layer, weight = _linear(out_features, in_features, True)
    x = torch.randn(2, rows, in_features, generator=torch.Generator().manual_seed(rows))
    want = F.linear(x, weight, layer.bias)
    assert layer.pack() and layer.packing == "native"
    with torch.inference_mode():
        got = layer(x)
        flat = layer(x.reshape(-1, in_features))
    assert got.shape == (2, rows, out_features)
    # Outputs are sums of K unit-variance terms (std sqrt(K)); float32 sums taken in another
    # order than MKL's differ by a few ulp of that.
    atol = 2e-5 * in_features ** 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
    torch.testing.assert_close(flat, want.reshape(-1, out_features), rtol=1e-5, atol=atol)


def test_native_kernel_names_a_bad_tensor() -> None:
    if not cpu_kernels.has_native_linear():
        pytest.skip("the core has no cpu_linear")
    packed = cpu_kernels.pack_linear_weight(torch.randn(20, 8))
    with pytest.raises(ValueError, match=r"packed_weight has shape \[2, 8, 16\], expected \[1, 8, 16\]"):
        cpu_kernels.cpu_linear(torch.randn(3, 8), packed, 16)
    with pytest.raises(ValueError, match="x is float64, expected float32"):
        cpu_kernels.cpu_linear(torch.randn(3, 8, dtype=torch.float64), packed, 20)


def test_auto_takes_native_where_the_core_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_LINEAR_ENV, "auto")
    want = "native" if cpu_kernels.has_native_linear() else (
        "onednn" if _has_onednn_linear() else None)
    assert packing_for(torch.empty(4, 4)) == want
    assert packing_for(torch.empty(4, 4, dtype=torch.bfloat16)) is None


def test_env_torch_keeps_the_plain_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_LINEAR_ENV, "torch")
    layer, _ = _linear(64, 32, False)
    assert not layer.pack() and layer.weight is not None


@pytest.mark.parametrize("packing", PACKINGS)
def test_env_refuses_what_it_cannot_pack(monkeypatch: pytest.MonkeyPatch, packing: str) -> None:
    monkeypatch.setenv(CPU_LINEAR_ENV, packing)
    layer = Linear(32, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        layer.pack()
    monkeypatch.setenv(CPU_LINEAR_ENV, "fast")
    with pytest.raises(ValueError, match="'fast' must be one of auto, native, onednn, torch"):
        Linear(32, 64).pack()


@pytest.mark.skipif(packing_for(torch.empty(1, 1)) is None, reason="no packed CPU linear here")
def test_packed_model_logits_equal_unpacked() -> None:
    """Stacked + packed SmolLM2 against the same weights with F.linear (same greedy rows), under
    whatever $INFERCEPT_CPU_LINEAR picks (the suite runs with native, onednn and auto)."""
    from infercept.model import KVCache, PagedAttentionMetadata
    from infercept.model.loader import load_model

    plain, packed = load_model(), load_model()
    packed.process_weights_after_loading()
    assert all(m.is_packed for m in packed.modules() if isinstance(m, Linear))
    ids = torch.randint(100, plain.config.vocab_size, (40,),
                        generator=torch.Generator().manual_seed(0))
    metadata = PagedAttentionMetadata.build([40], [40], [[0, 1, 2]], 16)
    logits = [model(ids, metadata.positions, metadata, KVCache(model.config, 4, 16))
              for model in (plain, packed)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=2e-4)


@pytest.mark.skipif(packing_for(torch.empty(1, 1)) is None, reason="no packed CPU linear here")
def test_hf_state_dict_gives_back_the_checkpoint() -> None:
    """Stacking at load and splitting in hf_state_dict are inverses, name for name, bit for bit;
    a packed model (plain weights gone) refuses."""
    from infercept.model.loader import load_model, load_weights
    from infercept.weights.default import default_model_path

    _, checkpoint = load_weights(default_model_path(), torch.float32)
    model = load_model()
    state = model.hf_state_dict()
    expected = {n for n in checkpoint
                if not (model.config.tie_word_embeddings and n == "lm_head.weight")}
    assert set(state) == expected
    for name in expected:
        assert torch.equal(state[name], checkpoint[name]), name
    model.process_weights_after_loading()
    with pytest.raises(RuntimeError, match="load the checkpoint again"):
        model.hf_state_dict()
