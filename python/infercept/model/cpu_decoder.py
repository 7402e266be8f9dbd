"""The decoder layers as native calls on the CPU: one call a layer on every step.

``infercept._core.CpuDecoderLayer`` (``cpp/src/cpu_decoder_layer.cpp``) runs a whole layer: the
fused residual norms, the four packed GEMMs, RoPE with the KV write, paged attention and SwiGLU,
the same native operations the module path of ``model/llama.py`` calls one by one, so the
logits are bit-equal (``tests/python/test_cpu_decoder.py``). The attention treats every token
of the step as a row over its own sequence's cache prefix (``plan.row_block_tables``, context
``position + 1``), so a prefill or recompute chunk runs through the same call as a decode: its
KV is written before the attention reads it, and the context length makes it causal. What goes
is the Python between the operations: at batch 1 a step's ~300 module calls, dispatch checks,
DLPack exports and fresh output tensors. With ``$INFERCEPT_CPU_ATTENTION=torch`` the plan has
no row tables and each layer runs as the part before its attention and the part after it, with
:func:`paged_attention` (SDPA) between them.

It is built once, after packing (:meth:`LlamaForCausalLM.process_weights_after_loading`), when
every piece can run natively: float32 weights on the CPU, each Linear packed for the native
kernel (so not under tensor parallelism, whose row-parallel layers all-reduce), the core built
with the kernels.
``$INFERCEPT_CPU_DECODER`` picks: ``auto`` (default: native where it can run) or ``torch``
(always the module path, e.g. to compare).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils.dlpack import to_dlpack

from infercept import _core
from infercept.model import cpu_kernels
from infercept.model.attention import paged_attention
from infercept.model.linear import Linear

if TYPE_CHECKING:
    from infercept.model.attention import AttentionPlan, PagedAttentionMetadata
    from infercept.model.llama import LlamaForCausalLM
    from infercept.model.paged_cache import KVCache

DECODER_ENV = "INFERCEPT_CPU_DECODER"
_CHOICES = ("auto", "torch")


def _decoder_choice() -> str:
    choice = os.environ.get(DECODER_ENV, "auto")
    if choice not in _CHOICES:
        raise ValueError(f"${DECODER_ENV}={choice!r} must be one of {', '.join(_CHOICES)}")
    return choice


def _is_native_linear(module: object) -> bool:
    # Exactly Linear: a subclass (sharding's AllReduceLinear) does more than the product.
    return type(module) is Linear and module.packing == "native"  # type: ignore[attr-defined]


class CpuDecoder:
    """The native layers of one model, and the scratch buffers they share."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        config = model.config
        self.scale = config.head_dim ** -0.5
        self.heads = (config.num_heads, config.num_kv_heads, config.head_dim)
        self.scratch = _core.CpuDecoderScratch()
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            bias = attn.qkv_proj.bias
            self.layers.append(_core.CpuDecoderLayer(
                to_dlpack(layer.input_layernorm.weight.detach()),
                to_dlpack(attn.qkv_proj.packed_weight),
                None if bias is None else to_dlpack(bias.detach()),
                to_dlpack(attn.o_proj.packed_weight),
                to_dlpack(layer.post_attention_layernorm.weight.detach()),
                to_dlpack(mlp.gate_up_proj.packed_weight), to_dlpack(mlp.down_proj.packed_weight),
                attn.num_heads, attn.num_kv_heads, attn.head_dim,
                layer.input_layernorm.eps))

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> CpuDecoder | None:
        """The native layers of ``model``, or None where a piece cannot run natively (or
        ``$INFERCEPT_CPU_DECODER=torch``).

        Raises:
            ValueError: ``$INFERCEPT_CPU_DECODER`` is not one of its choices.
        """
        if _decoder_choice() == "torch" or not hasattr(_core, "CpuDecoderLayer"):
            return None
        if not (cpu_kernels.has_native_layer_ops() and cpu_kernels.has_native_decode()):
            return None
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if not all(map(_is_native_linear, linears)) or attn.o_proj.bias is not None or \
                    not cpu_kernels.can_run_layer_ops(*norms):
                return None
            if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
                return None
        return cls(model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                metadata: PagedAttentionMetadata, plan: AttentionPlan, kv_cache: KVCache,
                before_layer: Callable[[int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs every layer on a step: one native call a layer when the plan has row tables
        (the native attention, every step), else two around :func:`paged_attention`.

        Args:
            x: ``[T, hidden]`` float32 embeddings of the new tokens; overwritten.
            cos: ``[T, head_dim]`` RoPE cosines, ``sin`` the sines.
            metadata: The step's slot mapping.
            plan: From :func:`plan_attention`.
            kv_cache: Written at the slot mapping.
            before_layer: As :meth:`LlamaForCausalLM.forward`'s.

        Returns:
            The last layer's MLP output and the residual stream before it, ``[T, hidden]``.
        """
        # 0 + embeddings is the embeddings exactly: the first layer's norm then adds as the
        # others do.
        residual = torch.zeros_like(x)
        step = (x, residual, cos.contiguous(), sin.contiguous(), metadata.slot_mapping)
        layers = zip(self.layers, kv_cache.key_caches, kv_cache.value_caches)
        if plan.row_block_tables is not None:
            batch = _core.CpuDecodeBatch(
                *map(to_dlpack, step + (plan.row_block_tables, plan.row_context_lens)),
                self.scale)
            for index, (layer, key_cache, value_cache) in enumerate(layers):
                if before_layer is not None:
                    before_layer(index)
                layer.decode(batch, to_dlpack(key_cache), to_dlpack(value_cache), self.scratch)
            return x, residual
        tokens = _core.CpuTokenBatch(*map(to_dlpack, step))
        heads, kv_heads, head_dim = self.heads
        qkv = torch.empty(x.shape[0], heads + 2 * kv_heads, head_dim)
        q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
        for index, (layer, key_cache, value_cache) in enumerate(layers):
            if before_layer is not None:
                before_layer(index)
            layer.pre_attention(tokens, to_dlpack(key_cache), to_dlpack(value_cache),
                                to_dlpack(qkv))
            out = paged_attention(q, k, v, key_cache, value_cache, plan, self.scale)
            layer.post_attention(tokens, to_dlpack(out.view(x.shape[0], -1)), self.scratch)
        return x, residual
