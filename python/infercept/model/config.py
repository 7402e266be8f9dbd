"""Architecture description of a Llama-family decoder, read from HF config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type == "llama3"``).

    Attributes:
        factor: How much the context was extended; low frequencies are divided by it.
        low_freq_factor: Wavelengths above ``original_max_position_embeddings / low_freq_factor``
            are fully scaled.
        high_freq_factor: Wavelengths below ``original_max_position_embeddings / high_freq_factor``
            are left unscaled; in between the two are interpolated.
        original_max_position_embeddings: Context length the model was pre-trained with.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2).

    Attributes:
        vocab_size: Number of token ids.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU MLP.
        num_layers: Number of decoder layers.
        num_heads: Number of query heads.
        num_kv_heads: Number of key/value heads (GQA when smaller than ``num_heads``).
        head_dim: Width of one attention head.
        rms_norm_eps: Epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: Llama-3 frequency scaling, or None for plain RoPE.
        max_position_embeddings: Longest context the model supports.
        tie_word_embeddings: Whether the LM head reuses the token embedding matrix.
        attention_bias: Whether the q/k/v projections have biases (Qwen2).
        bos_token_id: Beginning-of-sequence token id, or None.
        eos_token_id: End-of-sequence token id, or None.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    def to_hf_dict(self) -> dict[str, Any]:
        """Returns an HF ``LlamaConfig``-style dict (what ``from_hf_dict`` reads back)."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Reads an HF config.json dict (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``).

        Raises:
            ValueError: A required key is missing, or the activation/RoPE type is unsupported.
        """
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [key for key in required if key not in hf]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}")
        hidden_act = hf.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r} is unsupported; only 'silu' (SwiGLU) is")
        num_heads = int(hf["num_attention_heads"])
        # transformers 5 moved rope_theta/rope_scaling into one rope_parameters dict.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling_from_dict(rope),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", hf.get("model_type") == "qwen2")),
            bos_token_id=_first_token_id(hf.get("bos_token_id")),
            eos_token_id=_first_token_id(hf.get("eos_token_id")),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], *, vocab_size: int,
                           has_output_weight: bool, has_qkv_bias: bool = False) -> ModelConfig:
        """Reads GGUF key/value metadata (``general.architecture`` and ``{arch}.*`` keys).

        Args:
            metadata: GGUF fields as python values.
            vocab_size: Rows of the token embedding tensor (some files omit ``{arch}.vocab_size``).
            has_output_weight: Whether the file has ``output.weight``; without it the
                embeddings are tied.
            has_qkv_bias: Whether the file has ``attn_q.bias`` tensors (Qwen2).

        Raises:
            ValueError: The architecture is not Llama-family or a required key is missing.
        """
        arch = metadata.get("general.architecture")
        if arch not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"GGUF architecture {arch!r} is unsupported (llama, mistral, qwen2)")

        def get(key: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden_size = int(get("embedding_length"))
        num_heads = int(get("attention.head_count"))
        head_dim = int(metadata.get(f"{arch}.attention.key_length") or hidden_size // num_heads)
        # llama.cpp stores Llama-3 scaling as a rope_freqs tensor (checked by the loader) and
        # linear/YaRN scaling under rope.scaling.type; neither is implemented here.
        scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type != "none":
            raise ValueError(f"GGUF RoPE scaling {scaling_type!r} is unsupported")
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=not has_output_weight,
            attention_bias=has_qkv_bias,
            bos_token_id=_first_token_id(metadata.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_first_token_id(metadata.get("tokenizer.ggml.eos_token_id")),
        )


def _rope_scaling_from_dict(rope: Mapping[str, Any]) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if rope_type != "llama3":
        raise ValueError(f"rope_type={rope_type!r} is unsupported; only default and llama3 are")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _first_token_id(value: Any) -> int | None:
    # HF allows a list of eos ids; the engine's stop set is configured elsewhere, this is the primary.
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)
