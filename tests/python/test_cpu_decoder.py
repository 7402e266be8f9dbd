"""The native decoder layers (model/cpu_decoder.py) against the module path they replace: the
same native operations in the same order, so logits and caches must be bit-equal, for prefill,
decode-only and mixed (chunk + decodes) steps, with the native attention and with SDPA, on random Llamas (with and without q/k/v biases,
tied and untied heads) and on the embedded SmolLM2 through the engine."""

from __future__ import annotations

import pytest
import torch

from infercept import _core
from infercept.model import cpu_kernels
from infercept.model.attention import BACKEND_ENV, PagedAttentionMetadata
from infercept.model.config import ModelConfig
from infercept.model.cpu_decoder import DECODER_ENV, CpuDecoder
from infercept.model.linear import CPU_LINEAR_ENV
from infercept.model.llama import LlamaForCausalLM
from infercept.model.paged_cache import KVCache

pytestmark = pytest.mark.skipif(not hasattr(_core, "CpuDecoderLayer"),
                                reason="infercept._core without the native decode layer")

BLOCK_SIZE = 8


def random_state_dict(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """HF-named random weights for ``config`` (from the meta model's own shapes)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    from infercept.model.llama import _hf_parameter_shapes
    return {name: torch.randn(shape, generator=g) * (0.3 if name.endswith("norm.weight") else 0.1)
            + (1.0 if name.endswith("norm.weight") else 0.0)
            for name, shape in _hf_parameter_shapes(model).items()}


def built(config: ModelConfig, weights, monkeypatch, decoder: str) -> LlamaForCausalLM:
    monkeypatch.setenv(DECODER_ENV, decoder)
    model = LlamaForCausalLM.from_state_dict(config, weights)
    model.process_weights_after_loading()
    return model


def run_steps(model: LlamaForCausalLM, config: ModelConfig, prompts, decode_steps: int):
    """Prefills ``prompts`` (one step, the module path), then decodes ``decode_steps`` greedy
    tokens of every sequence together; returns each decode step's logits and the caches."""
    max_len = max(map(len, prompts)) + decode_steps
    blocks_per_seq = -(-max_len // BLOCK_SIZE)
    cache = KVCache(config, num_blocks=len(prompts) * blocks_per_seq + 1, block_size=BLOCK_SIZE)
    # Sequence s owns blocks 1 + s * blocks_per_seq ...: block 0 stays unused, so a stray write
    # to slot 0 (an unset slot mapping) would show in the cache comparison.
    tables = [list(range(1 + s * blocks_per_seq, 1 + (s + 1) * blocks_per_seq))
              for s in range(len(prompts))]
    meta = PagedAttentionMetadata.build([len(p) for p in prompts], [len(p) for p in prompts],
                                        tables, BLOCK_SIZE)
    logits = model(torch.tensor([t for p in prompts for t in p]), meta.positions, meta, cache)
    lengths = [len(p) for p in prompts]
    out = [logits]
    for step in range(decode_steps):
        next_ids = logits.argmax(-1).tolist()
        # Step 3: sequence 0 takes a 4-token chunk (its token and a 3-token "tool output")
        # beside the others' decodes, as a resumed request does.
        new = [[t] + ([5, 6, 7] if step == 3 and s == 0 else []) for s, t in enumerate(next_ids)]
        lengths = [n + len(ids) for n, ids in zip(lengths, new)]
        meta = PagedAttentionMetadata.build([len(ids) for ids in new], lengths, tables, BLOCK_SIZE)
        logits = model(torch.tensor([t for ids in new for t in ids]), meta.positions, meta, cache)
        out.append(logits)
    return out, cache


CONFIGS = {
    "gqa": ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16),
    "bias-tied": ModelConfig(vocab_size=80, hidden_size=48, intermediate_size=40, num_layers=2,
                             num_heads=3, num_kv_heads=1, head_dim=16, attention_bias=True,
                             tie_word_embeddings=True),
    "odd-head-dim": ModelConfig(vocab_size=50, hidden_size=36, intermediate_size=24,
                                num_layers=2, num_heads=2, num_kv_heads=2, head_dim=6),
}


@pytest.mark.parametrize("attention", ["auto", "torch"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_native_decode_layers_are_bit_equal_to_the_module_path(name, attention, monkeypatch):
    """With the native attention every step (prefill, decodes, the mixed step) is one call a
    layer; with $INFERCEPT_CPU_ATTENTION=torch every step is two calls around SDPA."""
    monkeypatch.setenv(BACKEND_ENV, attention)
    config = CONFIGS[name]
    weights = random_state_dict(config, seed=len(name))
    native = built(config, weights, monkeypatch, "auto")
    modules = built(config, weights, monkeypatch, "torch")
    assert native._cpu_decoder is not None and modules._cpu_decoder is None
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist()
               for n in (5, 17, 9)]
    # Which native path each step took: one call a layer or two around the attention.
    paths = []
    forward = CpuDecoder.forward
    monkeypatch.setattr(CpuDecoder, "forward", lambda self, x, cos, sin, meta, plan, *a: (
        paths.append("whole" if plan.row_block_tables is not None else "split"),
        forward(self, x, cos, sin, meta, plan, *a))[1])
    got, got_cache = run_steps(native, config, prompts, decode_steps=12)
    assert paths == ["whole" if attention == "auto" else "split"] * 13
    want, want_cache = run_steps(modules, config, prompts, decode_steps=12)
    assert len(got) == len(want) == 13
    for step, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {step}: max diff {(a - b).abs().max()}"
    for a, b in zip(got_cache.key_caches + got_cache.value_caches,
                    want_cache.key_caches + want_cache.value_caches):
        assert torch.equal(a, b)


def test_not_built_where_a_piece_cannot_run_natively(monkeypatch):
    config = CONFIGS["gqa"]
    weights = random_state_dict(config, seed=1)
    monkeypatch.setenv(CPU_LINEAR_ENV, "torch")  # no packed weights for the native GEMM
    assert built(config, weights, monkeypatch, "auto")._cpu_decoder is None
    monkeypatch.setenv(CPU_LINEAR_ENV, "auto")
    model = LlamaForCausalLM.from_state_dict(config, weights)
    assert CpuDecoder.build(model) is None  # not packed yet
    monkeypatch.setenv(DECODER_ENV, "fused")
    with pytest.raises(ValueError, match=r"\$INFERCEPT_CPU_DECODER='fused' must be one of"):
        CpuDecoder.build(model)


def test_bad_tensors_raise_naming_them(monkeypatch):
    config = CONFIGS["gqa"]
    model = built(config, random_state_dict(config, seed=2), monkeypatch, "auto")
    layer = model._cpu_decoder.layers[0]
    x, residual = torch.randn(2, 64), torch.zeros(2, 64)
    cos = sin = torch.ones(2, 16)
    slots = torch.tensor([0, 9])
    tables = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="residual"):
        _core.CpuDecodeBatch(x, torch.zeros(3, 64), cos, sin, slots, tables, lens, 0.25)
    with pytest.raises(ValueError, match="slot_mapping"):
        _core.CpuDecodeBatch(x, residual, cos, sin, slots.int(), tables, lens, 0.25)
    batch = _core.CpuDecodeBatch(x, residual, cos, sin, slots, tables, lens, 0.25)
    key_cache, value_cache = torch.zeros(2, BLOCK_SIZE, 2, 16), torch.zeros(2, BLOCK_SIZE, 2, 16)
    with pytest.raises(ValueError, match="value_cache"):
        layer.decode(batch, key_cache, torch.zeros(2, BLOCK_SIZE, 1, 16), model._cpu_decoder.scratch)
    with pytest.raises(ValueError, match=r"slot_mapping\[1\]=17 must be in \[0, num_slots=16\)"):
        bad = _core.CpuDecodeBatch(x, residual, cos, sin, torch.tensor([0, 17]), tables, lens,
                                   0.25)
        layer.decode(bad, key_cache, value_cache, model._cpu_decoder.scratch)
    # The split path checks the slots before it touches x: a bad one loses nothing.
    before = x.clone()
    tokens = _core.CpuTokenBatch(x, residual, cos, sin, torch.tensor([0, 17]))
    with pytest.raises(ValueError, match=r"slot_mapping\[1\]=17"):
        layer.pre_attention(tokens, key_cache, value_cache, torch.empty(2, 8, 16))
    assert torch.equal(x, before) and not residual.any()
    with pytest.raises(ValueError, match="qkv"):
        layer.pre_attention(tokens, key_cache, value_cache, torch.empty(2, 7, 16))
    with pytest.raises(ValueError, match="attention must be float32"):
        layer.post_attention(tokens, torch.empty(2, 63), model._cpu_decoder.scratch)
    with pytest.raises(ValueError, match="down_packed"):
        _core.CpuDecoderLayer(torch.ones(64), model.model.layers[0].self_attn.qkv_proj.packed_weight,
                              None, model.model.layers[0].self_attn.o_proj.packed_weight,
                              torch.ones(64), model.model.layers[0].mlp.gate_up_proj.packed_weight,
                              torch.zeros(4, 96, 16, dtype=torch.float64), 4, 2, 16, 1e-5)


def test_engine_greedy_output_is_the_same_either_way(monkeypatch):
    """The embedded SmolLM2 through the engine: a batch of greedy requests decodes the same
    tokens with the native layers as with the module path."""
    from infercept import EngineConfig, LLMEngine, SamplingParams

    prompts = [list(range(100 + 7 * i, 140 + 11 * i)) for i in range(3)]
    outputs = {}
    for decoder in ("auto", "torch"):
        monkeypatch.setenv(DECODER_ENV, decoder)
        with LLMEngine(EngineConfig(block_size=16, num_device_blocks=40)) as engine:
            assert (engine.model._cpu_decoder is not None) == (decoder == "auto")
            ids = [engine.add_request(prompt_token_ids=p,
                                      params=SamplingParams(temperature=0.0, max_tokens=16,
                                                            ignore_eos=True)) for p in prompts]
            outputs[decoder] = [list(o.token_ids) for o in engine.run_until_done(ids)]
    assert outputs["auto"] == outputs["torch"]
