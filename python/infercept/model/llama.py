"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) over a paged KV cache.

An HF ``LlamaForCausalLM`` state dict loads as is: :meth:`LlamaForCausalLM.from_state_dict`
checks it under HF's names, then stacks q/k/v_proj into one ``qkv_proj`` and gate/up_proj into
one ``gate_up_proj`` (as vLLM does), so each layer runs four GEMMs instead of seven.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from infercept.model import cpu_kernels
from infercept.model.attention import (AttentionPlan, PagedAttentionMetadata, paged_attention,
                                       plan_attention, write_kv)
from infercept.model.config import ModelConfig
from infercept.model.cpu_decoder import CpuDecoder
from infercept.model.linear import Linear
from infercept.model.paged_cache import KVCache
from infercept.model.rope import apply_rope, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as transformers does, then cast back.

    Called with a residual it is the pre-norm residual step, vLLM's fused_add_rms_norm:
    ``residual = residual + x`` and its norm, returned as ``(norm, residual)``. On the CPU in
    float32 both run as one native call each (cpu_kernels), in place: ``x`` then holds the
    norm and ``residual`` the sum, so neither may be read for its old value afterwards.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # x: [T, hidden]
        if cpu_kernels.can_run_layer_ops(x, self.weight) and (
                residual is None or cpu_kernels.can_run_layer_ops(residual)):
            if residual is None:
                out = torch.empty_like(x)
                cpu_kernels.rms_norm(out, x, self.weight, self.eps)
                return out
            cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's fused kernel: the same float32 arithmetic in one op instead of six.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaAttention(nn.Module):
    """GQA self-attention that writes new K/V into the paged cache and reads context from it."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        # Rows: the query heads, then the KV heads' keys, then their values (HF's q, k, v).
        self.qkv_proj = Linear(config.hidden_size,
                               (config.num_heads + 2 * config.num_kv_heads) * config.head_dim,
                               bias=config.attention_bias)
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                plan: AttentionPlan) -> torch.Tensor:
        """x: ``[T, hidden]``; cos/sin: ``[T, head_dim]``; caches: ``[N, block, H_kv, D]``."""
        num_tokens = x.shape[0]
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, heads + 2 * kv_heads, self.head_dim)
        if cpu_kernels.can_run_layer_ops(qkv, cos, sin, key_cache, value_cache) and \
                slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous():
            # One native call: RoPE on q and k in place in qkv, then k and v into their slots.
            cpu_kernels.rotary_write_kv(qkv, cos, sin, key_cache, value_cache, slot_mapping)
            q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
        else:
            # One rotation for the query and key heads together: [T, H + H_kv, D].
            qk = apply_rope(qkv[:, :heads + kv_heads], cos, sin)
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]
            write_kv(k, v, key_cache, value_cache, slot_mapping)
        o = paged_attention(q, k, v, key_cache, value_cache, plan, self.head_dim ** -0.5)
        return self.o_proj(o.reshape(num_tokens, heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``, gate and up as one GEMM."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        # Rows: gate_proj's, then up_proj's.
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden]
        gate_up = self.gate_up_proj(x)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        # In place, in the GEMM's output: a fresh [T, I] buffer would be page-faulted in every
        # layer (glibc maps allocations this large anew each time); 290 against ~50 us a call
        # at 32 rows. down_proj reads the gate half through its row stride. On the CPU in
        # float32 one native call, the one the native decode layer (cpu_decoder.py) makes.
        if cpu_kernels.can_run_layer_ops(gate_up):
            cpu_kernels.silu_mul(gate_up)
            return self.down_proj(gate)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention block followed by a pre-norm MLP block, both residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                slot_mapping: torch.Tensor, plan: AttentionPlan
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: ``[T, hidden]`` the previous block's output (the embeddings when ``residual`` is
        None, in the first layer); residual: the stream before it. Returns this layer's MLP
        output and the stream before it, which the next norm adds (vLLM's layout): each residual
        add is fused into the norm after it."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, key_cache, value_cache, slot_mapping, plan)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM whose forward takes a flat multi-sequence batch and paged caches."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        # A tied model's head as its own Linear once its copy of the embeddings is packed
        # (process_weights_after_loading); None while the head reads the embeddings directly.
        self._packed_tied_head: Linear | None = None
        # The layers as native calls, once packed (None where they cannot run).
        self._cpu_decoder: CpuDecoder | None = None
        self.register_buffer(
            "inv_freq", rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling),
            persistent=False)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                        dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
        """Builds the model around HF-named weights without a random initialisation pass.

        Args:
            config: Architecture.
            state_dict: HF ``LlamaForCausalLM`` parameter names to tensors; ``lm_head.weight`` may
                be absent or ignored when embeddings are tied.
            dtype: Parameter dtype.

        Raises:
            ValueError: A parameter is missing, unexpected or of the wrong shape.
        """
        with torch.device("meta"):
            model = cls(config)
        expected = _hf_parameter_shapes(model)
        weights = {name: t for name, t in state_dict.items()
                   if not (config.tie_word_embeddings and name == "lm_head.weight")}
        missing = sorted(expected.keys() - weights.keys())
        unexpected = sorted(weights.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(f"weights do not fit the config: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
        for name, shape in expected.items():
            if weights[name].shape != shape:
                raise ValueError(f"weight {name} has shape {tuple(weights[name].shape)}, "
                                 f"expected {tuple(shape)}")
        model.load_state_dict(_stack_projections({n: t.to(dtype) for n, t in weights.items()}),
                              strict=False, assign=True)
        # The RoPE buffer was created on meta; inv_freq stays float32 whatever the weights' dtype.
        model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        return model.eval()

    def process_weights_after_loading(self) -> None:
        """Packs every linear layer's weight for the native CPU kernel or oneDNN where it can
        (``model/linear.py``) and builds the native decode layers where they can run
        (``model/cpu_decoder.py``); call once the model is on the device it runs on. Idempotent.

        A tied model's LM head gets its own packed copy of the embeddings (the lookup keeps the
        plain table): one more ``vocab x hidden`` in memory for a GEMM about twice as fast.
        """
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        if self.config.tie_word_embeddings and self._packed_tied_head is None:
            # Built on meta and handed the table itself: packing reorders it into a new
            # tensor and drops the head's reference, so no vocab x hidden buffer is spent.
            with torch.device("meta"):
                head = Linear(self.config.hidden_size, self.config.vocab_size)
            head.weight = torch.nn.Parameter(self.model.embed_tokens.weight.detach(),
                                             requires_grad=False)
            if head.pack():
                self._packed_tied_head = head
        if self._cpu_decoder is None:
            self._cpu_decoder = CpuDecoder.build(self)

    @property
    def is_packed(self) -> bool:
        """Whether some layer dropped its plain weight for a packed copy."""
        return any(m.is_packed for m in self.modules() if isinstance(m, Linear))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under HF's names (stacked layers split back, views, no copy).

        Raises:
            RuntimeError: The model is packed (its plain weights are gone): load them again.
        """
        if self.is_packed:
            raise RuntimeError("the model's weights are packed for the CPU kernels "
                               "(process_weights_after_loading); load the checkpoint again")
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            parts = _checkpoint_parts(self, name)
            if parts is None:
                out[name] = tensor
            else:
                names, rows = zip(*parts)
                out.update(zip(names, tensor.split(list(rows))))
        return out

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """``[R, hidden]`` -> ``[R, vocab]`` logits in the weights' dtype."""
        if self._packed_tied_head is not None:
            return self._packed_tied_head(x)
        if self.config.tie_word_embeddings:
            return F.linear(x, self.model.embed_tokens.weight)
        return self.lm_head(x)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: PagedAttentionMetadata, kv_cache: KVCache,
                logits_indices: torch.Tensor | None = None,
                before_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Runs one step over a flat batch, writing its K/V into ``kv_cache``.

        Args:
            input_ids: ``[T]`` int64 new tokens of all sequences, concatenated.
            positions: ``[T]`` int64 position of each token in its sequence.
            metadata: Where each sequence's tokens and K/V blocks are.
            kv_cache: Paged caches of every layer; written at ``metadata.slot_mapping``.
            logits_indices: ``[R]`` int64 flat rows that need logits; defaults to the last new
                token of each sequence, so the ``[hidden, vocab]`` head runs on ``B`` rows, not
                ``T``.
            before_layer: Called with layer ``l`` before it runs: the swap engine waits there
                for layer ``l``'s copies, so transfers of later layers overlap this one.

        Returns:
            ``[R, vocab]`` logits in float32.
        """
        if logits_indices is None:
            logits_indices = metadata.last_token_indices()
        plan = plan_attention(metadata)
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # [T, head_dim] each
        if self._cpu_decoder is not None:
            x, residual = self._cpu_decoder.forward(x, cos, sin, metadata, plan, kv_cache,
                                                    before_layer)
        else:
            for index, (layer, key_cache, value_cache) in enumerate(
                    zip(self.model.layers, kv_cache.key_caches, kv_cache.value_caches)):
                if before_layer is not None:
                    before_layer(index)
                x, residual = layer(x, residual, cos, sin, key_cache, value_cache,
                                    metadata.slot_mapping, plan)
        # The last residual add and the final norm on the rows that need logits only: [R, hidden].
        x, _ = self.model.norm(x.index_select(0, logits_indices),
                               residual.index_select(0, logits_indices))
        return self._lm_head(x).to(torch.float32)


# Checkpoint names stacked into one of this module's Linear layers, in row order.
_STACKED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _stacked_row_counts(model: LlamaForCausalLM, fused: str) -> tuple[int, ...]:
    c = model.config
    if fused == "self_attn.qkv_proj":
        return (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim)
    return (c.intermediate_size, c.intermediate_size)


def _checkpoint_parts(model: LlamaForCausalLM, name: str) -> list[tuple[str, int]] | None:
    """A stacked parameter's checkpoint names with their row counts, in row order (e.g.
    ``...qkv_proj.weight`` -> q, k, v_proj's); None for a parameter stored as is."""
    for fused, parts in _STACKED.items():
        prefix, dot, suffix = name.rpartition(f"{fused}.")
        if dot and suffix in ("weight", "bias"):
            return [(f"{prefix}{part}.{suffix}", rows)
                    for part, rows in zip(parts, _stacked_row_counts(model, fused))]
    return None


def _hf_parameter_shapes(model: LlamaForCausalLM) -> dict[str, torch.Size]:
    """The HF checkpoint names and shapes that ``model`` loads (stacked layers split back)."""
    shapes: dict[str, torch.Size] = {}
    for name, param in model.named_parameters():
        parts = _checkpoint_parts(model, name)
        if parts is None:
            shapes[name] = param.shape
        else:
            shapes.update((part, torch.Size((rows, *param.shape[1:]))) for part, rows in parts)
    return shapes


def _stack_projections(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> this module's: each layer's q/k/v and gate/up concatenated by rows."""
    out = dict(weights)
    for fused, parts in _STACKED.items():
        for name in [n for n in weights if n.endswith((f"{parts[0]}.weight", f"{parts[0]}.bias"))]:
            prefix, _, suffix = name.rpartition(f"{parts[0]}.")
            out[f"{prefix}{fused}.{suffix}"] = torch.cat(
                [out.pop(f"{prefix}{part}.{suffix}") for part in parts])
    return out
