"""Random-weight Llama checkpoints as HF directories (tests and benchmarks of shapes the
embedded model lacks, e.g. 8 KV heads for tensor parallelism).

The weights are scaled so activations stay O(1) (each linear ``~N(0, 1/fan_in)``, embeddings
``~N(0, 1)``, tied to the head) and logits spread widely (std ~ sqrt(hidden)): greedy choices
are far from ties, so a different but exact summation order (an all-reduce) cannot flip them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def write_random_llama(path: str | os.PathLike[str], *, vocab_size: int = 49152,
                       hidden_size: int = 64, num_heads: int = 16, num_kv_heads: int = 8,
                       head_dim: int = 8, intermediate_size: int = 128, num_layers: int = 2,
                       max_position_embeddings: int = 4096, seed: int = 0) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` of a random Llama into ``path``.

    The default vocabulary is SmolLM2's, so the embedded tokenizer can serve the model.

    Returns:
        ``path``, loadable by :func:`infercept.model.load_model`.
    """
    from safetensors.torch import save_file

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": vocab_size, "hidden_size": hidden_size,
              "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
              "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
              "head_dim": head_dim, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": True,
              "hidden_act": "silu", "torch_dtype": "float32"}
    gen = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(hidden_size, generator=gen)

    weights = {"model.embed_tokens.weight": torch.randn(vocab_size, hidden_size, generator=gen),
               "model.norm.weight": torch.ones(hidden_size)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        weights.update({
            p + "input_layernorm.weight": norm(),
            p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": linear(num_heads * head_dim, hidden_size),
            p + "self_attn.k_proj.weight": linear(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.v_proj.weight": linear(num_kv_heads * head_dim, hidden_size),
            p + "self_attn.o_proj.weight": linear(hidden_size, num_heads * head_dim),
            p + "mlp.gate_proj.weight": linear(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": linear(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": linear(hidden_size, intermediate_size),
        })
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(weights, str(path / "model.safetensors"))
    return path
