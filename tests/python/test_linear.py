"""The oneDNN-packed CPU Linear against F.linear, and the stacked projections against HF names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infercept.model.linear import CPU_LINEAR_ENV, Linear, can_pack

pytestmark = pytest.mark.skipif(not can_pack(torch.empty(1, 1)),
                                reason="torch has no oneDNN linear here")


def _linear(out_features: int, in_features: int, bias: bool) -> tuple[Linear, torch.Tensor]:
    layer = Linear(in_features, out_features, bias=bias)
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    layer.weight.data.copy_(weight)
    if bias:
        layer.bias.data.normal_(generator=generator)
    return layer, weight


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_f_linear(rows: int, bias: bool) -> None:
    layer, weight = _linear(960, 576, bias)
    x = torch.randn(rows, 576)
    want = F.linear(x, weight, layer.bias)
    assert layer.pack() and layer.is_packed and layer.weight is None
    assert layer.pack()  # idempotent
    with torch.inference_mode():
        got = layer(x)
        # Rows of a wider tensor (the gate half of gate_up, say) are read through their stride.
        strided = layer(torch.cat([x, x], dim=1)[:, :576])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(strided, want, rtol=1e-5, atol=1e-4)


def test_env_torch_keeps_the_plain_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_LINEAR_ENV, "torch")
    layer, _ = _linear(64, 32, False)
    assert not layer.pack() and layer.weight is not None


def test_env_onednn_refuses_what_it_cannot_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CPU_LINEAR_ENV, "onednn")
    layer = Linear(32, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        layer.pack()
    monkeypatch.setenv(CPU_LINEAR_ENV, "fast")
    with pytest.raises(ValueError, match="'fast' must be one of auto, onednn, torch"):
        Linear(32, 64).pack()


def test_packed_model_logits_equal_unpacked() -> None:
    """Stacked + packed SmolLM2 against the same weights with F.linear (same greedy rows)."""
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
