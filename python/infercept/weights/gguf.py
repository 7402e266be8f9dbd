"""GGUF loader: metadata to ModelConfig, tensors dequantized to HF-named torch weights."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infercept.model.config import ModelConfig
from infercept.weights.errors import InvalidWeightsError, WeightsNotFoundError

# GGUF tensor name -> HF LlamaForCausalLM name; "{}" is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(.+)")


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """Opens a GGUF file with ``gguf.GGUFReader``, memory-mapped.

    Raises:
        WeightsNotFoundError: ``path`` does not exist.
        InvalidWeightsError: It is not a readable GGUF file (bad magic, truncated, corrupt).
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise InvalidWeightsError(f"{path} is not a GGUF file (it is a directory)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InvalidWeightsError(f"{path} is not a valid GGUF file: it starts with {magic!r}, "
                                  f"not the magic b'GGUF'")
    try:
        return GGUFReader(path)
    except Exception as exc:  # GGUFReader raises ValueError, struct/numpy errors, IndexError...
        raise InvalidWeightsError(
            f"{path} is not a valid GGUF file ({path.stat().st_size} bytes; truncated or "
            f"corrupt): {exc}") from exc


def read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/value fields as python values (strings, numbers, lists)."""
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    return metadata


def dequantize(tensor: Any) -> np.ndarray:
    """Dequantizes one ``ReaderTensor`` to float32 in row-major HF order ``[rows, cols]``.

    Any type ``gguf.quants`` supports works (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants...).
    """
    from gguf import GGMLQuantizationType, quants

    if tensor.tensor_type == GGMLQuantizationType.F32:
        data = np.array(tensor.data, dtype=np.float32)  # copy: the memmap is read-only
    else:
        data = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    # GGUF lists dimensions fastest-first; numpy wants them reversed.
    return data.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's Q/K row permutation so rotate-half RoPE (HF layout) applies.

    llama.cpp's converter reorders each head's rows from ``[2, head_dim/2]`` (halves) to
    ``[head_dim/2, 2]`` (interleaved pairs) for its GPT-J-style RoPE kernel.

    Args:
        weight: ``[num_heads * head_dim, ...]`` rows of the q or k projection (weight or bias).
        num_heads: Query heads for q, KV heads for k.
    """
    rest = weight.shape[1:]
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape)


def load_gguf(path: str | os.PathLike[str],
              dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Reads a Llama-family GGUF into a config and HF-named, dequantized weights.

    Args:
        path: The ``.gguf`` file.
        dtype: Dtype of the returned tensors.

    Raises:
        WeightsNotFoundError: ``path`` does not exist.
        InvalidWeightsError: The file is not valid GGUF, is truncated, has an unsupported
            architecture or tensor type, or lacks tensors.
    """
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise InvalidWeightsError(
            f"{path}: Llama-3 RoPE scaling stored as rope_freqs is unsupported from GGUF; load "
            f"the model's Hugging Face directory instead")
    if "token_embd.weight" not in tensors:
        raise InvalidWeightsError(f"{path}: no token_embd.weight tensor")
    metadata = read_metadata(reader)
    try:
        config = ModelConfig.from_gguf_metadata(
            metadata,
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),
            has_output_weight="output.weight" in tensors,
            has_qkv_bias="blk.0.attn_q.bias" in tensors)
    except ValueError as exc:
        raise InvalidWeightsError(f"{path}: {exc}") from exc
    weights = {}
    for name, tensor in tensors.items():
        hf_name = _hf_name(name)
        if hf_name is None:
            raise InvalidWeightsError(f"{path}: unexpected tensor {name}")
        try:
            weight = torch.from_numpy(dequantize(tensor))
        except (NotImplementedError, ValueError) as exc:
            raise InvalidWeightsError(
                f"{path}: cannot dequantize {name} ({tensor.tensor_type.name}): {exc}") from exc
        # Only the llama converter permutes; qwen2 GGUFs keep HF's rotate-half layout.
        permuted = metadata["general.architecture"] in ("llama", "mistral")
        if permuted and ".attn_q." in name:
            weight = unpermute_rope(weight, config.num_heads)
        elif permuted and ".attn_k." in name:
            weight = unpermute_rope(weight, config.num_kv_heads)
        weights[hf_name] = weight.to(dtype)
    return config, weights


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
