"""The engine loop over the native scheduler and the real model runner (DESIGN.md §3).

One ``step()`` is one pass of the shared loop (``step_loop.StepLoop``, which the simulator's
replay drives too) with the engine's work around it:

    tool runtime and scripted timers: finished pauses -> resumes queued (CoreEvents)
    [StepLoop.step]
      queued resumes                   -> scheduler.resume_batch (one call)
      scheduler.schedule(now)          -> StepPlan
      runner.execute(plan)             -> StepResult: sampled tokens, timings (swaps pipelined
                                          per layer with the forward; structured rows' grammar
                                          masks computed on a helper thread meanwhile)
      detokenize, stop check, grammar  -> result.finished
      scheduler.update(plan, result)   (append tokens, free, account waste)
    tool-call parser / scripted points -> intercepts queued, then scheduler.intercept_batch
    tool runtime: launch the call (the engine keeps stepping while it runs)

While a request is paused the policy decides, per iteration, whether its KV is preserved on
the device, swapped to the host pool or discarded for recompute; the engine only records the
decisions (``InterceptRecord.kv_actions``).
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections import deque
from collections.abc import Iterable, Sequence as SequenceT

from infercept._core import (CostModel, Policy, RequestState, Scheduler, SchedulerConfig, StepOutput,
                             StepPlan, StepResult, UnknownRequestError)
from infercept.engine.config import EngineConfig
from infercept.engine.model_runner import ModelRunner
from infercept.engine.outputs import InterceptRecord, RequestOutput
from infercept.engine.profiler import load_or_measure
from infercept.engine.sequence import Sequence
from infercept.engine.step_loop import CoreEvents, StepLoop, WallClock
from infercept.backend import select_device
from infercept.engine.swap import SwapEngine
from infercept.engine.tp_executor import TensorParallelExecutor
from infercept.model import KVCache, LlamaForCausalLM, Tokenizer, load_model
from infercept.model.loader import resolve_model_path
from infercept.engine.profiles import load_profile
from infercept.engine.structured import GrammarMatchers
from infercept.sampling import SamplingParams
from infercept.tools import (DurationEstimator, TagParser, Tool, ToolCall, ToolCallError,
                             ToolCallParser, ToolRegistry, ToolRuntime)



@dataclasses.dataclass(frozen=True)
class StepTiming:
    """The last executed step: its size and what the executor reported (bench calibration)."""

    num_batched_tokens: int
    num_context_tokens: int
    duration_s: float     # the executor's: forward, copies and sampling
    swap_stall_s: float


class LLMEngine:
    """Runs requests with tool calls over one model.

    Args:
        config: How to build the engine (model, policy, pool sizes, limits).
        tools: Server-side tools; more can be registered later with ``register_tool``.
        parser: Finds tool calls in generated text (default: ``<tool_call>{json}</tool_call>``).
        cost_model: Overrides ``config.cost_profile`` and the start-up measurement.
        tool_errors: 'abort' ends a request whose tool raised or timed out (finish_reason
            'error'); 'return' splices the error message into the context as the tool output.
        model, tokenizer: Already loaded from ``config.model`` (engines may share weights;
            each has its own KV cache).
    """

    def __init__(self, config: EngineConfig | None = None, *,
                 tools: Iterable[Tool] | ToolRegistry | None = None,
                 parser: ToolCallParser | None = None, cost_model: CostModel | None = None,
                 tool_errors: str = "abort", model: LlamaForCausalLM | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        self.config = config = config or EngineConfig()
        if tool_errors not in ("abort", "return"):
            raise ValueError(f"tool_errors={tool_errors!r} must be 'abort' or 'return'")
        self._tool_errors = tool_errors
        path = resolve_model_path(config.model)
        self.model_name = path.name
        self.device = select_device(config.device)
        self.tokenizer = tokenizer or Tokenizer.from_path(path)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if config.tensor_parallel_size > 1:
            # One scheduler here, N ranks: this process is rank 0 (docs/tensor_parallel.md).
            self.runner = TensorParallelExecutor(path, config, self.device, model, eos)
            self.model = self.runner.model  # shard 0; self.runner.model_config is the whole
            self.kv_cache, self.swap_engine = self.runner.kv_cache, self.runner.swap_engine
            num_device_blocks = self.runner.num_device_blocks
            num_host_blocks = self.runner.num_host_blocks
        else:
            self.model = (model or load_model(path, config.torch_dtype)).to(self.device)
            self.model.process_weights_after_loading()
            num_device_blocks, num_host_blocks = config.pool_sizes(
                self.model.config.kv_bytes_per_token(config.torch_dtype))
            self.kv_cache = KVCache(self.model.config, num_device_blocks, config.block_size,
                                    config.torch_dtype, self.device)
            self.swap_engine = SwapEngine(self.kv_cache, num_host_blocks)
            self.runner = ModelRunner(self.model, self.kv_cache, self.swap_engine, eos)
        model_config = self.model.config
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        kv_capacity_tokens = num_device_blocks * config.block_size
        if cost_model is not None:
            self.cost_model = cost_model
        elif config.cost_profile is not None:
            self.cost_model = load_profile(config.cost_profile)
        elif config.tensor_parallel_size > 1:
            # Cached apart from N=1 (another forward, another T_swap), measured on all ranks.
            self.cost_model = load_or_measure(
                self.model, self.kv_cache, self.swap_engine,
                f"{path}.tp{config.tensor_parallel_size}", kv_capacity_tokens,
                config.max_batched_tokens,
                measure=lambda: self.runner.measure_cost_model(path.stem, kv_capacity_tokens))
        else:
            self.cost_model = load_or_measure(self.model, self.kv_cache, self.swap_engine,
                                              str(path), kv_capacity_tokens,
                                              config.max_batched_tokens)

        scheduler_config = SchedulerConfig()
        scheduler_config.policy = Policy.parse(config.policy)
        scheduler_config.block_size = config.block_size
        scheduler_config.num_device_blocks = num_device_blocks
        scheduler_config.num_host_blocks = num_host_blocks
        scheduler_config.max_batched_tokens = config.max_batched_tokens
        scheduler_config.max_running_requests = config.max_running_requests
        scheduler_config.max_context_tokens = self.max_model_len
        scheduler_config.enable_prefix_caching = config.enable_prefix_caching
        scheduler_config.rank_s_per_predicted_token = config.rank_s_per_predicted_token
        scheduler_config.learn_output_lengths = config.learn_output_lengths
        scheduler_config.vocab_size = model_config.vocab_size
        scheduler = Scheduler(scheduler_config, self.cost_model)
        # Resumes and intercepts queue here and cross to the core once per step each.
        self._events = CoreEvents(scheduler, on_error=self._resume_failed)
        self._clock = WallClock()
        self._loop = StepLoop(scheduler, self.runner, self._clock, self._events)

        if isinstance(tools, ToolRegistry):
            self.tools = tools
        else:
            self.tools = ToolRegistry(list(tools or []))
        self.parser = parser or TagParser()
        self.estimator = DurationEstimator()
        self._tool_runtime: ToolRuntime | None = None
        self.last_step: StepTiming | None = None
        self.grammars = GrammarMatchers(self.tokenizer, model_config.vocab_size)
        self.runner.grammars = self.grammars
        self._seqs: dict[int, Sequence] = {}
        self._timers: list[tuple[float, int, int]] = []  # (resume_at_s, request_id, after_tokens)
        # Requests changed outside a step's own work (a resume the core refused at a flush),
        # reported by the next step.
        self._touched: dict[int, Sequence] = {}
        self.num_steps = 0

    @property
    def scheduler(self) -> Scheduler:
        """The native core (shared by the loop and its event queue)."""
        return self._loop.scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Scheduler) -> None:
        # Benchmarks wrap it (benchmarks/count_crossings.py): every user must see the wrapper.
        self._loop.scheduler = self._events.scheduler = scheduler

    # ---- requests ------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds on the engine clock (since construction)."""
        return self._clock.now()

    def register_tool(self, tool: Tool | object, **kwargs: object) -> Tool:
        """Registers a server-side tool (a ``Tool`` or a callable plus ``name=``, ...)."""
        return self.tools.register(tool, **kwargs)  # type: ignore[arg-type]

    def add_request(self, prompt: str | None = None, params: SamplingParams | None = None, *,
                    prompt_token_ids: SequenceT[int] | None = None, use_tools: bool = True,
                    client_tools: Iterable[str] = (), cache_salt: str | None = None,
                    predicted_output_tokens: int | None = None) -> int:
        """Queues a request and returns its id.

        Args:
            prompt: The prompt text (tokenized with the model's tokenizer).
            params: Sampling and stopping; default greedy-free ``SamplingParams()``.
            prompt_token_ids: The prompt as tokens, instead of ``prompt``.
            use_tools: Run calls to the engine's registered tools inside the engine.
            client_tools: Tool names the caller runs: a call to one pauses the request
                (``RequestOutput.paused``) until ``resume``.
            cache_salt: Tenant isolation for the prefix cache: the request's blocks are found
                only by requests with the same salt (None: the shared, unsalted cache).
            predicted_output_tokens: A predictor's count of the tokens the request will
                generate over all its turns; ranks it when ``rank_s_per_predicted_token`` is
                set (see ``set_predicted_output_tokens``).

        Raises:
            ValueError: No prompt, an empty prompt, a token id outside the vocabulary, a
                prompt that leaves no room within ``max_model_len``, one larger than the KV
                pool, ``params.n`` above 1, a cache_salt that is not a string, a logit_bias token id outside the
                vocabulary, or a structured output the grammar compiler rejects for this
                tokenizer.
        """
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"n={params.n}: add_request runs one choice; add each with "
                             "params.for_choice(i) (LLM.generate and the server fan n out)")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt={cache_salt!r} must be a string or None")
        _check_prediction(predicted_output_tokens)
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompt and prompt_token_ids")
        token_ids = (self.tokenizer.encode(prompt) if prompt is not None
                     else [int(t) for t in prompt_token_ids])  # type: ignore[union-attr]
        if not token_ids:
            raise ValueError("the prompt is empty: it must hold at least one token")
        vocab = self.model.config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(token_ids)} tokens leaves no room to generate within "
                             f"max_model_len={self.max_model_len}")
        self._check_logit_bias(params)
        matcher = (self.grammars.build(params.structured_output)
                   if params.structured_output is not None else None)
        now = self.now()
        # Prompt logprobs need the logits of every prompt position: no prefix-cache hits for
        # the prompt (its blocks still feed the cache), as in vLLM.
        request_id = self.scheduler.add_request(
            token_ids, now, 0, cache_salt or "",
            skip_reading_prefix_cache=params.prompt_logprobs is not None)
        if matcher is not None:
            self.grammars.attach(request_id, matcher)
        if predicted_output_tokens is not None:
            self.scheduler.set_predicted_output_tokens(request_id, predicted_output_tokens)
        output = RequestOutput(request_id=request_id, prompt=prompt,
                               prompt_token_ids=list(token_ids), arrival_s=now)
        self._seqs[request_id] = Sequence(
            output=output, params=params, token_ids=list(token_ids), server_tools=use_tools,
            client_tools=frozenset(client_tools),
            scripted=deque(sorted(params.intercepts, key=lambda i: i.after_tokens)))
        self.runner.add_request(request_id, params, token_ids)
        return request_id

    def set_predicted_output_tokens(self, request_id: int, num_tokens: int | None) -> None:
        """Updates the prediction of what the request has still to generate (over its
        remaining turns), e.g. at a tool's return; None withdraws it. The request is re-ranked
        at once when ``rank_s_per_predicted_token`` is set, and the value is kept otherwise."""
        self._check_live(self._seq(request_id))
        _check_prediction(num_tokens)
        self.scheduler.set_predicted_output_tokens(request_id, -1 if num_tokens is None else num_tokens)

    def get(self, request_id: int) -> RequestOutput:
        """The request's latest output."""
        return self._seq(request_id).output

    def intercept(self, request_id: int, expected_duration_s: float | None = None,
                  name: str = "") -> None:
        """Pauses a running request that has just sampled, until ``resume`` (client-driven)."""
        seq = self._seq(request_id)
        self._check_live(seq)
        self._pause(seq, InterceptRecord("client", len(seq.generated), name=name,
                                         expected_duration_s=expected_duration_s))
        try:
            self._events.flush()  # the caller's call: a request that cannot pause raises here
        except Exception:
            seq.output.intercepts.pop()
            raise

    def resume(self, request_id: int, tool_output: str | None = None, *,
               token_ids: SequenceT[int] | None = None, raw: bool = False,
               params: SamplingParams | None = None,
               client_tools: Iterable[str] | None = None) -> None:
        """Continues a request paused for a client-side tool.

        Args:
            request_id: The paused request.
            tool_output: The tool's text, spliced in with ``config.tool_response_format``
                (as given with ``raw=True``).
            token_ids: Exact tokens to append instead of text.
            params: New sampling for what follows (a server's follow-up request); its
                ``max_tokens`` and ``min_tokens`` count tokens generated from the resume on,
                as for a fresh request (the penalties too: the context so far is their
                prompt), a seeded request restarts its generator, and its structured output
                (or none) governs the tokens from the resume on, from the grammar's start.
                Without ``params`` the request keeps its grammar state: mid-grammar it goes on
                constraining, and a grammar that ended (a tool call's ends at the call) no
                longer applies.
            client_tools: New client-side tool names (None keeps the current ones).

        Raises:
            UnknownRequestError: No such request.
            ValueError: The request is not paused for the caller (running, finished or
                paused on a server tool), or the output is malformed.
        """
        seq = self._seq(request_id)
        record = seq.open_intercept
        if seq.output.finished or record is None or record.kind != "client":
            state = ("finished" if seq.output.finished else "paused on a server tool"
                     if record is not None else "running")
            raise ValueError(f"request {request_id} is {state}; only a request paused for a "
                             "client tool can resume")
        if (tool_output is None) == (token_ids is None):
            raise ValueError("give exactly one of tool_output and token_ids")
        if token_ids is None:
            text = tool_output if raw else self.config.tool_response_format.format(output=tool_output)
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            tokens = [int(t) for t in token_ids]
        if params is not None:
            self._check_logit_bias(params)
            matcher = (self.grammars.build(params.structured_output)
                       if params.structured_output is not None else None)
            # Both token limits count from the resume on, as for a fresh request.
            num_before = len(seq.generated)
            seq.params = dataclasses.replace(
                params, max_tokens=num_before + params.max_tokens,
                min_tokens=num_before + params.min_tokens if params.min_tokens else 0)
            self.runner.set_params(request_id, seq.params, seq.token_ids)
            self.grammars.release(request_id)
            if matcher is not None:
                self.grammars.attach(request_id, matcher)
        if client_tools is not None:
            seq.client_tools = frozenset(client_tools)
        self._end_pause(seq, tokens, self.now(), output=tool_output)

    def abort(self, request_id: int) -> None:
        """Ends a request in any state and frees its memory; a finished request is left as is."""
        seq = self._seq(request_id)
        if seq.output.finished:
            return
        self._terminate(seq, "abort", self.now())

    def has_unfinished(self) -> bool:
        """Whether any request can still make progress without the caller (not paused on it)."""
        return any(not s.output.finished and not s.output.paused for s in self._seqs.values())

    def release(self, request_id: int) -> None:
        """Forgets a finished request's record."""
        seq = self._seq(request_id)
        if not seq.output.finished:
            raise ValueError(f"request {request_id} has not finished; abort it first")
        del self._seqs[request_id]

    # ---- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one iteration; returns the outputs of the requests it changed.

        When nothing can run (every live request waits on a tool) it waits for the next tool
        result or scripted resume instead of spinning.
        """
        if isinstance(self.runner, TensorParallelExecutor):
            self.runner.check_workers()  # a failed engine plans nothing it cannot run
        touched, self._touched = self._touched, {}
        self._collect_pauses(touched)
        sampling_ids: list[int] = []
        finished: list[int] = []

        def decide_finished(plan: StepPlan, result: StepResult, now: float) -> list[int]:
            sampling_ids.extend(plan.sampling_request_ids.tolist())
            finished.extend(self._accept_tokens(plan, result, sampling_ids, now, touched))
            return finished

        plan, result, step_output, _ = self._loop.step(decide_finished)
        if result is None:
            # Nothing ran, but planning may have given up on a request (it outgrew the pool):
            # the empty plan's update reports it.
            self._report_aborts(step_output, touched)
            self._record_kv_actions(step_output)
            self._wait_for_events()
            touched.update(self._touched)
            self._touched = {}
            return [s.output for s in touched.values()]

        self.last_step = StepTiming(plan.num_batched_tokens, plan.num_context_tokens,
                                    result.duration_s, result.swap_stall_s)
        self.num_steps += 1
        for request_id in finished:
            self._forget(request_id)
        self._report_aborts(step_output, touched)
        self._record_kv_actions(step_output)
        for request_id in sampling_ids:
            seq = self._seqs[request_id]
            if not seq.output.finished:
                self._maybe_pause(seq)
        self._events.flush()  # the step's intercepts (and resumes of failed calls), one call each
        if self.config.check_invariants:
            self.check_invariants()
        touched.update(self._touched)
        self._touched = {}
        return [s.output for s in touched.values()]

    def _accept_tokens(self, plan: StepPlan, result: StepResult, sampling_ids: list[int],
                       now: float, touched: dict[int, Sequence]) -> list[int]:
        """Appends each sampled token (detokenize, stop check, grammar); returns who stops."""
        finished: list[int] = []
        if not sampling_ids:
            return finished
        num_cached = plan.num_cached_tokens.tolist()
        for request_id, token, cached in zip(sampling_ids, result.sampled_token_ids, num_cached):
            seq = self._seqs[request_id]
            if seq.output.first_token_s is None:  # first token: how much the cache served
                seq.output.num_cached_tokens = cached
                seq.output.prompt_logprobs = self.runner.take_prompt_logprobs(request_id)
            decision = seq.append_sampled(token, self.tokenizer, now, self.max_model_len)
            logprob = self.runner.last_logprobs.get(request_id)
            if logprob is not None:
                seq.output.logprobs.append(logprob)
            grammar_error = self.grammars.accept(request_id, token)
            touched[request_id] = seq
            if decision.should_stop:
                finished.append(request_id)
                seq.finish(decision.reason or "stop", now)
            elif grammar_error is not None:  # the mask should make this impossible
                finished.append(request_id)
                seq.finish("error", now, grammar_error)
        return finished

    def _report_aborts(self, step_output: StepOutput, touched: dict[int, Sequence]) -> None:
        """Ends the requests the scheduler gave up on (e.g. a context that outgrew the pool)."""
        now = self.now()
        for request_id, reason in zip(step_output.aborted, step_output.abort_reasons):
            seq = self._seqs[request_id]
            seq.finish("error", now, error=reason)
            touched[request_id] = seq
            self._forget(request_id)

    def run_until_done(self, request_ids: Iterable[int]) -> list[RequestOutput]:
        """Steps until each given request has finished or paused for the caller."""
        ids = list(request_ids)
        while any(not self._seqs[i].output.finished and not self._seqs[i].output.paused
                  for i in ids):
            self.step()
        return [self._seqs[i].output for i in ids]

    def check_invariants(self) -> None:
        """Raises unless blocks are conserved and every live request's tokens match the core."""
        self._events.flush()
        self.scheduler.check_invariants()
        for seq in self._seqs.values():
            if seq.output.finished:
                continue
            core_tokens = self.scheduler.request(seq.request_id).token_ids
            expected = seq.token_ids if seq.rewrite_from is None else seq.token_ids[:seq.rewrite_from]
            if core_tokens[:len(expected)] != expected or len(core_tokens) != len(expected) + (
                    seq.rewrite_from is not None):
                raise AssertionError(f"request {seq.request_id}: the core holds {len(core_tokens)} "
                                     f"tokens that disagree with the engine's {len(seq.token_ids)}")

    def shutdown(self) -> None:
        """Aborts what is live and stops the tool runtime."""
        for seq in list(self._seqs.values()):
            if not seq.output.finished:
                self._terminate(seq, "abort", self.now())
        if self._tool_runtime is not None:
            self._tool_runtime.shutdown()
            self._tool_runtime = None
        self.grammars.close()
        if isinstance(self.runner, TensorParallelExecutor):
            self.runner.shutdown()

    # ---- pauses ----------------------------------------------------------------------------

    @property
    def tool_runtime(self) -> ToolRuntime:
        """Started on the first server-side tool call (it owns a thread and a pool)."""
        if self._tool_runtime is None:
            self._tool_runtime = ToolRuntime(self.tools)
        return self._tool_runtime

    def _maybe_pause(self, seq: Sequence) -> None:
        """Pauses a request that just sampled if it called a tool or hit a scripted intercept."""
        if seq.scripted and len(seq.generated) == seq.scripted[0].after_tokens:
            script = seq.scripted.popleft()
            record = InterceptRecord("scripted", len(seq.generated),
                                     expected_duration_s=script.duration_s)
            self._pause(seq, record)
            heapq.heappush(self._timers, (seq.paused_at_s + script.duration_s, seq.request_id,
                                          record.after_tokens))
            return
        if not (seq.server_tools or seq.client_tools):
            return
        # While a grammar is in force it decides where a call ends (see find_tool_call).
        in_grammar = (self.grammars.has(seq.request_id)
                      and not self.grammars.is_complete(seq.request_id))
        found = seq.find_tool_call(self.parser, errors_are_text=in_grammar)
        if found is None:
            return
        if isinstance(found, ToolCallError):
            self._tool_failed(seq, f"malformed tool call {found.raw!r}: {found.message}")
            return
        self._start_call(seq, found)

    def _start_call(self, seq: Sequence, call: ToolCall) -> None:
        rewrite_from = seq.rewrite_from
        seq.trim_after(call.span[1], self.tokenizer)
        if seq.rewrite_from is not None and rewrite_from is None:
            self.grammars.replace_last(seq.request_id, seq.token_ids[seq.rewrite_from:])
        if call.name in seq.client_tools:
            record = InterceptRecord("client", len(seq.generated), call.name, dict(call.arguments),
                                     expected_duration_s=self.estimator.estimate(call.name))
            self._pause(seq, record)
            seq.output.paused = True
            return
        if not seq.server_tools or call.name not in self.tools:
            self._tool_failed(seq, f"unknown tool {call.name!r}; registered tools: "
                                   f"{', '.join(self.tools.names) or 'none'}",
                              call.name, call.arguments)
            return
        tool = self.tools.get(call.name)
        expected = self.estimator.estimate(call.name, tool.expected_duration_s)
        self._pause(seq, InterceptRecord("tool", len(seq.generated), call.name,
                                         dict(call.arguments), expected_duration_s=expected))
        self.tool_runtime.submit(seq.request_id, call)

    def _tool_failed(self, seq: Sequence, error: str, name: str = "",
                     arguments: dict | None = None) -> None:
        """A call that cannot run: end the request, or tell the model, per ``tool_errors``."""
        record = InterceptRecord("tool", len(seq.generated), name, dict(arguments or {}),
                                 error=error)
        if self._tool_errors == "abort":
            record.duration_s = 0.0
            seq.output.intercepts.append(record)
            self._terminate(seq, "error", self.now(), error)
            return
        self._pause(seq, record)
        self._end_pause(seq, self._tool_tokens(f"error: {error}"), self.now(), error=error)

    def _pause(self, seq: Sequence, record: InterceptRecord) -> None:
        now = self.now()
        expected = record.expected_duration_s
        # The tool's name lets the core learn its durations (continuum's TTL comes from them).
        # Queued: the step's intercepts cross in one call, and the policy's first KV state
        # comes back to this record then.
        self._events.intercept(seq.request_id, now, -1.0 if expected is None else expected,
                               record.name, on_state=lambda state: self._note_record(record, state))
        seq.paused_at_s = now
        seq.output.intercepts.append(record)

    def _end_pause(self, seq: Sequence, tokens: list[int], now: float, output: str | None = None,
                   error: str | None = None) -> None:
        record = seq.open_intercept
        assert record is not None
        record.duration_s = now - seq.paused_at_s
        record.output, record.error = output, error
        seq.output.tool_time_s += record.duration_s
        seq.output.paused = False
        if len(seq.token_ids) + len(tokens) >= self.max_model_len:
            self._terminate(seq, "length", now)
            return
        # The tool's tokens bypass the grammar; one that ended at the call (a tool call's
        # grammar) no longer applies to what follows, one mid-way goes on constraining.
        if self.grammars.is_complete(seq.request_id):
            self.grammars.release(seq.request_id)
        tail, num_replaced = seq.append_tool_tokens(tokens, self.tokenizer)
        self.runner.note_context(seq.request_id, tokens)
        self._events.resume(seq.request_id, tail, now, num_replaced)

    def _resume_failed(self, request_id: int, error: str) -> None:
        """A queued resume the core refused (a context over the pool): the request ends."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.output.finished:
            return
        if self.scheduler.request(request_id).state not in (RequestState.FINISHED,
                                                             RequestState.ABORTED):
            self.scheduler.abort(request_id)  # refused before it changed anything
        if self._tool_runtime is not None:
            self._tool_runtime.cancel(request_id)
        seq.finish("error", self.now(), error)
        self._forget(request_id)
        self._touched[request_id] = seq

    def _collect_pauses(self, touched: dict[int, Sequence]) -> None:
        """Resumes requests whose tool finished or whose scripted pause ran out."""
        if self._tool_runtime is not None:
            for result in self._tool_runtime.poll():
                seq = self._seqs.get(result.request_id)  # type: ignore[arg-type]
                if seq is None or seq.output.finished:
                    continue
                touched[seq.request_id] = seq
                self.estimator.observe(result.name, result.duration_s)
                if result.error is None:
                    self._end_pause(seq, self._tool_tokens(result.output), self.now(),
                                    output=result.output)
                elif self._tool_errors == "abort":
                    self._terminate(seq, "error", self.now(), result.error)
                else:
                    self._end_pause(seq, self._tool_tokens(f"error: {result.error}"), self.now(),
                                    error=result.error)
        now = self.now()
        while self._timers and self._timers[0][0] <= now:
            _, request_id, after_tokens = heapq.heappop(self._timers)
            seq = self._seqs.get(request_id)
            record = seq.open_intercept if seq is not None else None
            if record is None or record.kind != "scripted" or record.after_tokens != after_tokens:
                continue  # aborted meanwhile
            script = next(i for i in seq.params.intercepts if i.after_tokens == after_tokens)
            if script.text is not None:
                tokens = self.tokenizer.encode(script.text, add_special_tokens=False)
                output = script.text
            else:
                tokens = [self._placeholder_token] * script.num_tokens  # type: ignore[operator]
                output = None
            self._end_pause(seq, tokens, now, output=output)
            touched[request_id] = seq

    def _wait_for_events(self) -> None:
        """Sleeps until the next tool result or scripted resume (nothing else can change)."""
        if not any(s.open_intercept is not None and s.open_intercept.kind != "client"
                   for s in self._seqs.values() if not s.output.finished):
            return
        timeout = 0.05
        if self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - self.now()))
        if self._tool_runtime is not None and self._tool_runtime.num_in_flight:
            self._tool_runtime.wait(timeout)
        else:
            time.sleep(timeout)

    def _record_kv_actions(self, step_output: StepOutput) -> None:
        """Notes the policy's moves of paused contexts, as update() reports them."""
        for change in step_output.kv_changes:
            seq = self._seqs.get(change.request_id)
            if seq is not None and not seq.output.finished:
                self._note_kv_action(seq, change.state.label)

    @staticmethod
    def _note_kv_action(seq: Sequence, state: str) -> None:
        record = seq.open_intercept
        if record is not None:
            LLMEngine._note_record(record, state)

    @staticmethod
    def _note_record(record: InterceptRecord, state: str) -> None:
        if not record.kv_actions or record.kv_actions[-1] != state:
            record.kv_actions.append(state)

    # ---- helpers ---------------------------------------------------------------------------

    @property
    def _placeholder_token(self) -> int:
        # Scripted intercepts that return a token count get this ordinary token repeated.
        return self.tokenizer.encode(" .", add_special_tokens=False)[-1]

    def _tool_tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(self.config.tool_response_format.format(output=text),
                                     add_special_tokens=False)

    def _check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.model.config.vocab_size
        bad = next((t for t in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")

    def _seq(self, request_id: int) -> Sequence:
        seq = self._seqs.get(request_id)
        if seq is None:
            raise UnknownRequestError(f"unknown request id {request_id}")
        return seq

    def _check_live(self, seq: Sequence) -> None:
        if seq.output.finished:
            raise ValueError(f"request {seq.request_id} has finished ({seq.output.finish_reason})")

    def _terminate(self, seq: Sequence, reason: str, now: float, error: str | None = None) -> None:
        """Ends a live request early: frees its blocks, cancels its tool call."""
        self._events.flush()  # a pause or resume of it still queued goes first
        if seq.output.finished:
            return  # the flush ended it (a resume the core refused)
        self.scheduler.abort(seq.request_id)
        if self._tool_runtime is not None:
            self._tool_runtime.cancel(seq.request_id)
        record = seq.open_intercept
        if record is not None:
            record.duration_s = now - seq.paused_at_s
            record.error = record.error or error
        seq.finish(reason, now, error)
        self._forget(seq.request_id)

    def _forget(self, request_id: int) -> None:
        """Drops the core's record, the runner's sampling state and the grammar matcher of a
        finished request."""
        if self.scheduler.contains(request_id):
            self.scheduler.remove(request_id)
        self.runner.remove_request(request_id)
        self.grammars.release(request_id)

    @property
    def stats(self) -> dict[str, float]:
        """Scheduler counters and the waste breakdown (fractions of device memory-time)."""
        self._events.flush()
        s = self.scheduler.stats()
        return {
            "num_running": s.num_running, "num_waiting": s.num_waiting,
            "num_intercepted": s.num_intercepted, "num_preserved": s.num_preserved,
            "num_swapped": s.num_swapped, "num_discarded": s.num_discarded,
            "num_free_device_blocks": s.num_free_device_blocks,
            "num_free_host_blocks": s.num_free_host_blocks,
            "num_swap_out_blocks": s.num_swap_out_blocks, "num_swap_in_blocks": s.num_swap_in_blocks,
            "num_recomputed_tokens": s.num_recomputed_tokens, "num_preemptions": s.num_preemptions,
            "prefix_cache_queries": s.prefix_cache_queries,
            "prefix_cache_hits": s.prefix_cache_hits,
            "prefix_cache_host_hits": s.prefix_cache_host_hits,
            "prefix_cache_hit_rate": (s.prefix_cache_hits / s.prefix_cache_queries
                                      if s.prefix_cache_queries else 0.0),
            "num_cached_device_blocks": s.num_cached_device_blocks,
            "num_cached_host_blocks": s.num_cached_host_blocks,
            "num_device_evictions": s.num_device_evictions,
            "num_host_evictions": s.num_host_evictions,
            "num_stored_blocks": s.num_stored_blocks,
            **self.scheduler.ledger().fractions(),
            "num_steps": self.num_steps,
        }

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


# The core keeps a predicted output count as an int32.
MAX_PREDICTED_OUTPUT_TOKENS = 2**31


def _check_prediction(num_tokens: int | None) -> None:
    if num_tokens is not None and (not isinstance(num_tokens, int) or isinstance(num_tokens, bool)
                                   or not 0 <= num_tokens < MAX_PREDICTED_OUTPUT_TOKENS):
        raise ValueError(f"predicted_output_tokens={num_tokens!r} must be an int in [0, 2**31) or None")
