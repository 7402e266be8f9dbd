"""The real executor: one StepPlan's forward over the paged KV cache, its block copies, and
the sampling of the rows that reach the end of their context.

The plan carries the forward's inputs as flat arrays built by the core (token ids, positions,
slot mapping, padded block tables, query starts, context lengths, logit rows), which become
tensors without a per-request walk; the runner starts the plan's swaps on the swap engine, runs
the model with a per-layer hook that waits for that layer's copies (DESIGN.md §3), masks the
logits of rows under a grammar (structured outputs), samples, and returns a StepResult. Per request it keeps only what sampling needs (the sampling parameters
and the generator), registered by the engine like vLLM v1's runner-side request states.
"""

from __future__ import annotations

import time

import torch

from infercept._core import StepPlan, StepResult
from infercept.engine.sampler import Sampler
from infercept.engine.structured import GrammarMatchers
from infercept.engine.swap import SwapEngine
from infercept.model import KVCache, LlamaForCausalLM, PagedAttentionMetadata
from infercept.sampling import SamplingParams


class ModelRunner:
    """Runs plans on one model, one paged KV cache and one swap engine (the Executor protocol)."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, swap_engine: SwapEngine) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.swap_engine = swap_engine
        self.device = kv_cache.key_caches[0].device
        self.sampler = Sampler()
        # Structured outputs: the engine's matchers (it advances them on each accepted token);
        # the runner masks the logits of their rows before sampling.
        self.grammars: GrammarMatchers | None = None
        self._params: dict[int, SamplingParams] = {}

    # ---- per-request sampling state ---------------------------------------------------------

    def add_request(self, request_id: int, params: SamplingParams) -> None:
        """Registers how a request samples (before its first scheduled step)."""
        self._params[request_id] = params

    def set_params(self, request_id: int, params: SamplingParams) -> None:
        """New sampling for what follows (a resumed request); a seeded one restarts its generator."""
        self._params[request_id] = params
        self.sampler.release(request_id)

    def remove_request(self, request_id: int) -> None:
        """Forgets a finished or aborted request (no-op if unknown)."""
        self._params.pop(request_id, None)
        self.sampler.release(request_id)

    # ---- the step ---------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepResult:
        """Runs one iteration and samples one token per sampling request, in plan order.

        Raises:
            KeyError: A sampling request was never registered with ``add_request``.
        """
        start_s = time.perf_counter()
        ids = plan.sampling_request_ids.tolist()
        grammars = self.grammars if self.grammars is not None and len(self.grammars) else None
        # The structured rows' masks are computed on a helper thread while the forward runs.
        masks = grammars.begin_masks(ids) if grammars is not None else None
        self.swap_engine.begin_plan(plan)
        try:
            logits = self._forward(plan)
            if masks is not None:
                grammars.apply(masks, logits)  # type: ignore[union-attr]
            tokens: list[int] = []
            if ids:
                tokens = self.sampler.sample(logits, ids, [self._params[i] for i in ids]).tolist()
        finally:
            # Even when the forward fails the copies must finish before their blocks change hands.
            stall_s = self.swap_engine.finish_step()
        duration_s = time.perf_counter() - start_s
        return StepResult(duration_s, min(stall_s, duration_s), [], tokens)

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        """``[plan.num_sampling_requests, vocab]`` float32 logits of the sampling rows."""
        if plan.num_scheduled == 0:
            return torch.empty(0, self.model.config.vocab_size)
        metadata = PagedAttentionMetadata.from_plan(plan, self.kv_cache.block_size, self.device)
        ids = torch.from_numpy(plan.input_ids).to(self.device)
        rows = torch.from_numpy(plan.logit_rows).to(self.device)
        return self.model(ids, metadata.positions, metadata, self.kv_cache,
                          logits_indices=rows, before_layer=self.swap_engine.wait_layer)
