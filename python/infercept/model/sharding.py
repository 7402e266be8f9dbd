"""Tensor-parallel shards of a Llama: which rows and columns of each weight a rank holds.

Megatron-style, two all-reduces per layer and no other communication in the forward:

- attention by KV-head groups: rank r holds KV heads ``[r*H_kv/N, (r+1)*H_kv/N)`` and the query
  heads that read them (HF GQA maps query head h to KV head ``h // (H/H_kv)``, so they are the
  contiguous query heads ``[r*H/N, (r+1)*H/N)``): rows of q/k/v_proj, columns of o_proj. A
  rank's attention needs only its own heads, so its paged KV cache holds only those heads.
- the MLP: gate_proj and up_proj by rows (output columns), down_proj by columns (input rows).
- o_proj and down_proj each give a partial sum of the residual update; they are summed across
  ranks (:class:`AllReduceLinear`) before the residual add, so every rank carries the same
  full residual stream.
- embedding, norms and the LM head are replicated: the embedding is a lookup (splitting it
  by vocabulary would add an all-reduce per step for no compute saved), and only rank 0 runs
  the head (the others ask for no logit rows), so splitting the head would save memory on the
  other ranks but add a gather of ``[rows, vocab]`` logits per step. On a CPU the copy costs
  only host memory; at the sizes where it matters (70B, vocab 128K) it is ~1 GB per rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from infercept.model.config import ModelConfig
from infercept.model.linear import Linear
from infercept.model.llama import LlamaForCausalLM

# Weights split by output rows (dim 0) and by input columns (dim 1); all others are replicated.
ROW_SPLIT = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
             "mlp.gate_proj.weight", "mlp.up_proj.weight")
COLUMN_SPLIT = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def check_tensor_parallel_size(config: ModelConfig, tensor_parallel_size: int) -> None:
    """Raises ValueError unless ``tensor_parallel_size`` splits the model's heads and MLP evenly."""
    n = tensor_parallel_size
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size={n!r} must be a positive int")
    if config.num_kv_heads % n:
        raise ValueError(f"tensor_parallel_size={n} does not divide the model's "
                         f"{config.num_kv_heads} KV heads (attention is split by KV-head groups)")
    if config.intermediate_size % n:
        raise ValueError(f"tensor_parallel_size={n} does not divide the model's MLP width "
                         f"intermediate_size={config.intermediate_size}")


def shard_config(config: ModelConfig, tensor_parallel_size: int) -> ModelConfig:
    """The architecture one rank runs: 1/N of the heads and of the MLP width, all else equal."""
    check_tensor_parallel_size(config, tensor_parallel_size)
    n = tensor_parallel_size
    return dataclasses.replace(config, num_heads=config.num_heads // n,
                               num_kv_heads=config.num_kv_heads // n,
                               intermediate_size=config.intermediate_size // n)


def shard_weights(weights: Mapping[str, torch.Tensor], rank: int,
                  tensor_parallel_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slice of HF-named Llama weights (copies, so the full tensors can go)."""
    if not 0 <= rank < tensor_parallel_size:
        raise ValueError(f"rank={rank} is outside [0, {tensor_parallel_size})")
    shard = {}
    for name, tensor in weights.items():
        if name.endswith(ROW_SPLIT):
            tensor = tensor.chunk(tensor_parallel_size, dim=0)[rank]
        elif name.endswith(COLUMN_SPLIT):
            tensor = tensor.chunk(tensor_parallel_size, dim=1)[rank]
        shard[name] = tensor.contiguous().clone()
    return shard


class AllReduceLinear(Linear):
    """A row-parallel linear (input split across ranks, no bias): ``x @ W.T`` summed across ranks.

    x: ``[T, in/N]`` -> ``[T, out]``, the same on every rank after ``all_reduce``. Packed (native
    kernel or oneDNN) like any :class:`Linear` by ``process_weights_after_loading``.
    """

    def __init__(self, weight: torch.Tensor, all_reduce: Callable[[torch.Tensor], None]) -> None:
        super().__init__(weight.shape[1], weight.shape[0])
        self.weight = nn.Parameter(weight, requires_grad=False)
        self._all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        self._all_reduce(out)  # in place: the partial sums become the full output
        return out


def build_shard(config: ModelConfig, shard: Mapping[str, torch.Tensor],
                tensor_parallel_size: int, all_reduce: Callable[[torch.Tensor], None],
                dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A rank's model over its weights (:func:`shard_weights`), o_proj and down_proj summed
    with ``all_reduce``.

    Its ``config`` is the shard's (:func:`shard_config`): 1/N of the heads and MLP width.

    Raises:
        ValueError: ``tensor_parallel_size`` does not divide the KV heads or the MLP width, or
            the weights are not a shard of ``config``.
    """
    local = shard_config(config, tensor_parallel_size)
    model = LlamaForCausalLM.from_state_dict(local, shard, dtype)
    for layer in model.model.layers:
        layer.self_attn.o_proj = AllReduceLinear(layer.self_attn.o_proj.weight.data, all_reduce)
        layer.mlp.down_proj = AllReduceLinear(layer.mlp.down_proj.weight.data, all_reduce)
    return model.eval()
