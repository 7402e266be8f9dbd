"""The real executor: one StepPlan's forward over the paged KV cache, with its block copies.

The runner turns the plan's integer bookkeeping into tensors (token ids, positions, block
tables, slot mapping), starts the plan's swaps on the swap engine, runs the model with a
per-layer hook that waits for that layer's copies (DESIGN.md §3), and returns the logits of
the requests that sample. It keeps no per-request state: the token ids come from the engine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from infercept._core import StepPlan
from infercept.engine.swap import SwapEngine
from infercept.model import KVCache, LlamaForCausalLM, PagedAttentionMetadata


@dataclass
class RunnerOutput:
    """What one executed step produced.

    Attributes:
        sampling_request_ids: Requests whose chunk reached the end of their context, in plan
            order; row ``i`` of ``logits`` is theirs.
        logits: ``[len(sampling_request_ids), vocab]`` float32.
        duration_s: Wall time of the step (forward and copies).
        swap_stall_s: Part of it the forward spent waiting on copies.
    """

    sampling_request_ids: list[int]
    logits: torch.Tensor
    duration_s: float
    swap_stall_s: float


class ModelRunner:
    """Runs plans on one model, one paged KV cache and one swap engine."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, swap_engine: SwapEngine) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.swap_engine = swap_engine
        self.device = kv_cache.key_caches[0].device

    def execute(self, plan: StepPlan, token_ids: Mapping[int, Sequence[int]]) -> RunnerOutput:
        """Runs one iteration.

        Args:
            plan: The scheduler's plan for this step.
            token_ids: Every scheduled request's context so far (prompt, generated and tool
                tokens), by request id; the plan says which slice of it each chunk computes.

        Returns:
            The sampling rows' logits and the step's timing.
        """
        start_s = time.perf_counter()
        self.swap_engine.begin_step(plan.swap_out, plan.swap_in)
        try:
            sampling_ids, logits = self._forward(plan, token_ids)
        finally:
            # Even when the forward fails the copies must finish before their blocks change hands.
            stall_s = self.swap_engine.finish_step()
        return RunnerOutput(sampling_ids, logits, time.perf_counter() - start_s, stall_s)

    def _forward(self, plan: StepPlan,
                 token_ids: Mapping[int, Sequence[int]]) -> tuple[list[int], torch.Tensor]:
        scheduled = plan.scheduled
        if not scheduled:
            return [], torch.empty(0, self.model.config.vocab_size)
        input_ids: list[int] = []
        query_lens, context_lens, block_tables = [], [], []
        logit_rows: list[int] = []
        sampling_ids: list[int] = []
        for s in scheduled:
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            context = token_ids[s.request_id]
            if end > len(context):
                raise RuntimeError(
                    f"plan computes tokens [{start}, {end}) of request {s.request_id} but its "
                    f"context holds {len(context)}: engine and scheduler disagree")
            input_ids.extend(context[start:end])
            query_lens.append(s.num_new_tokens)
            context_lens.append(end)
            block_tables.append(s.block_table)
            if s.samples:
                logit_rows.append(len(input_ids) - 1)
                sampling_ids.append(s.request_id)
        metadata = PagedAttentionMetadata.build(query_lens, context_lens, block_tables,
                                                self.kv_cache.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.int64, device=self.device)
        rows = torch.tensor(logit_rows, dtype=torch.int64, device=self.device)
        logits = self.model(ids, metadata.positions(), metadata, self.kv_cache,
                            logits_indices=rows, before_layer=self.swap_engine.wait_layer)
        return sampling_ids, logits
