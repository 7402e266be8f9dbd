"""The real executor: one StepPlan's forward over the paged KV cache, its block copies, and
the sampling of the rows that reach the end of their context.

The plan carries the forward's inputs as flat arrays built by the core (token ids, positions,
slot mapping, padded block tables, query starts, context lengths, logit rows), which become
tensors without a per-request walk; the runner starts the plan's swaps on the swap engine, runs
the model with a per-layer hook that waits for that layer's copies (DESIGN.md §3), masks the
logits of rows under a grammar (structured outputs), applies min_tokens, logit_bias and the
penalties (``logits_processors.py``), samples, and returns a StepResult; the logprobs of the
rows that ask for them wait in ``last_logprobs``. The head also runs on the prompt rows of
requests asking for prompt logprobs (``prompt_logprobs.py``), read with
``take_prompt_logprobs``. Per request it keeps only what sampling
needs (the sampling parameters, the generator, penalty counts), registered by the engine like
vLLM v1's runner-side request states.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from infercept._core import StepPlan, StepResult
from infercept.engine.logits_processors import LogitsProcessors, TokenLogprob
from infercept.engine.prompt_logprobs import PromptLogprobs
from infercept.engine.sampler import Sampler
from infercept.engine.structured import GrammarMatchers
from infercept.engine.swap import SwapEngine
from infercept.model import KVCache, LlamaForCausalLM, PagedAttentionMetadata
from infercept.sampling import SamplingParams


class ModelRunner:
    """Runs plans on one model, one paged KV cache and one swap engine (the Executor protocol).

    Args:
        eos_token_ids: The tokens ``min_tokens`` masks besides a request's stop tokens.
    """

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, swap_engine: SwapEngine,
                 eos_token_ids: Iterable[int] = ()) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.swap_engine = swap_engine
        self.device = kv_cache.key_caches[0].device
        self.sampler = Sampler()
        # Structured outputs: the engine's matchers (it advances them on each accepted token);
        # the runner masks the logits of their rows before sampling.
        self.grammars: GrammarMatchers | None = None
        self._params: dict[int, SamplingParams] = {}
        self.processors = LogitsProcessors(model.config.vocab_size, eos_token_ids, self.device)
        # request id -> the last step's sampled token with its logprob and top alternatives,
        # for the requests whose params ask for logprobs (read by the engine after execute).
        self.last_logprobs: dict[int, TokenLogprob] = {}
        self.prompt_logprobs = PromptLogprobs()

    # ---- per-request sampling state ---------------------------------------------------------

    def add_request(self, request_id: int, params: SamplingParams,
                    prompt_token_ids: Sequence[int] = ()) -> None:
        """Registers how a request samples (before its first scheduled step); the prompt
        feeds repetition_penalty."""
        self._params[request_id] = params
        self.processors.add(request_id, params, prompt_token_ids)
        if params.prompt_logprobs is not None:
            self.prompt_logprobs.add(request_id, params.prompt_logprobs, prompt_token_ids)

    def take_prompt_logprobs(self, request_id: int) -> list[TokenLogprob | None] | None:
        """A request's prompt logprobs once its prompt is prefilled (None if it did not ask);
        one entry per prompt token, the first None."""
        return self.prompt_logprobs.take(request_id)

    def set_params(self, request_id: int, params: SamplingParams,
                   context_token_ids: Sequence[int] = ()) -> None:
        """New sampling for what follows (a resumed request); a seeded one restarts its
        generator, and the penalties count the context so far as its prompt."""
        self._params[request_id] = params
        self.sampler.release(request_id)
        self.processors.set_params(request_id, params, context_token_ids)

    def note_context(self, request_id: int, token_ids: Sequence[int]) -> None:
        """Tokens appended without sampling (a tool's output): prompt to repetition_penalty."""
        self.processors.note_context(request_id, token_ids)

    def remove_request(self, request_id: int) -> None:
        """Forgets a finished or aborted request (no-op if unknown)."""
        self._params.pop(request_id, None)
        self.sampler.release(request_id)
        self.processors.remove(request_id)
        self.prompt_logprobs.remove(request_id)

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
            prompt_rows, prompt_targets = self.prompt_logprobs.rows(plan)
            logits = self._forward(plan, prompt_rows)
            if len(prompt_rows):
                num_sampling = len(ids)
                with torch.inference_mode():
                    self.prompt_logprobs.record(logits[num_sampling:], prompt_targets)
                logits = logits[:num_sampling]
            if masks is not None:
                grammars.apply(masks, logits)  # type: ignore[union-attr]
            tokens: list[int] = []
            self.last_logprobs = {}
            if ids:
                # The logits are inference tensors (the forward runs under inference mode).
                with torch.inference_mode():
                    self.processors.apply(logits, ids)
                    tokens = self.sampler.sample(logits, ids,
                                                 [self._params[i] for i in ids]).tolist()
                    self.last_logprobs = self.processors.logprobs(logits, ids, tokens)
                    self.processors.accept(ids, tokens)
        finally:
            # Even when the forward fails the copies must finish before their blocks change hands.
            stall_s = self.swap_engine.finish_step()
        duration_s = time.perf_counter() - start_s
        return StepResult(duration_s, min(stall_s, duration_s), [], tokens)

    def _forward(self, plan: StepPlan, extra_rows: np.ndarray) -> torch.Tensor:
        """``[plan.num_sampling_requests + len(extra_rows), vocab]`` float32 logits: the
        sampling rows, then ``extra_rows`` (flat token rows, for prompt logprobs)."""
        if plan.num_scheduled == 0:
            return torch.empty(0, self.model.config.vocab_size)
        metadata = PagedAttentionMetadata.from_plan(plan, self.kv_cache.block_size, self.device)
        ids = torch.from_numpy(plan.input_ids).to(self.device)
        logit_rows = plan.logit_rows
        if len(extra_rows):
            logit_rows = np.concatenate([logit_rows, extra_rows])
        rows = torch.from_numpy(logit_rows).to(self.device)
        return self.model(ids, metadata.positions, metadata, self.kv_cache,
                          logits_indices=rows, before_layer=self.swap_engine.wait_layer)
