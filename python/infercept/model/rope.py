"""Rotary position embeddings (rotate-half layout, as in HF Llama), with Llama-3 scaling."""

from __future__ import annotations

import math

import torch

from infercept.model.config import RopeScaling


def rope_inv_freq(head_dim: int, rope_theta: float, rope_scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies of each rotated pair, float32 ``[head_dim // 2]``.

    Computed exactly as transformers does (int64 arange cast to float32) so logits match it bit for
    bit in the RoPE step.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope_theta ** exponents)
    if rope_scaling is None:
        return inv_freq
    s = rope_scaling
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`; short ones are kept; the band in
    # between is interpolated linearly in 1/wavelength.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines for each token, each ``[T, head_dim]`` in ``dtype``.

    Args:
        positions: ``[T]`` int, the absolute position of each token in its sequence.
        inv_freq: ``[head_dim // 2]`` float32 from :func:`rope_inv_freq`.
        dtype: Dtype of the activations they multiply.
    """
    # Computed per step from positions rather than a [max_positions, head_dim] table: a
    # 128k-context Llama-3 table would cost more memory than the few FLOPs it saves.
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` ``[T, num_heads, head_dim]`` by per-token ``cos``/``sin`` ``[T, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
