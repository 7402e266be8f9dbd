"""Replays a scripted augmented workload through the native scheduler and an executor.

This is the engine loop of DESIGN.md §3 for workloads whose tool calls are scripted (the
paper's trace): each request decodes a segment's tokens, pauses for the segment's tool time,
gets the tool's tokens appended and decodes the next segment. The clock is virtual: it
advances by what the executor reports, and jumps over idle time to the next event.

With token ids (the default of the bench), requests enter the core as ids: the app's shared
prefix, then ids of their own (``token_ids.py``); tool returns are ids too and the executor
samples ids, so the core's prefix cache hits, evicts and serves a discarded context's own
blocks back as on the real engine. Without, the core counts tokens only and the cache is idle.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from infercept._core import CostModel, Policy, Scheduler, SchedulerConfig
from infercept.engine.executor import Executor
from infercept.engine.step_loop import CoreEvents, StepLoop, VirtualClock
from infercept.bench.metrics import RequestRecord
from infercept.bench.token_ids import SIM_VOCAB_SIZE, prompt_token_ids, tool_token_ids
from infercept.bench.workload import WorkloadRequest


class OutputPredictor:
    """The benchmarks' stand-in for a learned output-length predictor (LAMPS's): a true count
    times exp(N(0, error)), the errors drawn from a stream seeded by the run's seed."""

    def __init__(self, seed: int, error: float) -> None:
        if not error >= 0:
            raise ValueError(f"prediction_error={error} must be >= 0")
        self.error = error
        self._rng = random.Random(seed * 7919 + 17)

    def predict(self, true_count: int) -> int:
        if self.error == 0:
            return true_count
        return round(true_count * math.exp(self._rng.gauss(0.0, self.error)))


@dataclass
class _Progress:
    """Where one request is in its script."""

    request: WorkloadRequest
    segment: int = 0               # the segment being decoded
    segment_end_tokens: int = 0    # generated-token count at which that segment ends
    first_token_s: float | None = None
    finish_s: float | None = None
    tool_time_s: float = 0.0
    intercept_start_s: float = 0.0
    resume_s: float | None = None  # the tool returned here; no token of the new turn yet
    resumed_ttfts_s: list[float] = field(default_factory=list)


@dataclass
class ReplayResult:
    """Outcome of one replay: per-request records and the scheduler's own accounting."""

    records: list[RequestRecord]
    duration_s: float               # the arrival window
    end_s: float                    # when the last request finished (or the run was cut)
    num_steps: int
    waste: dict[str, float]         # byte-seconds per cause, and capacity (WasteLedger.as_dict)
    waste_fractions: dict[str, float]  # of the capacity, overall and per cause (WasteLedger.fractions)
    stats: dict[str, int]
    aborted: dict[str, str] = field(default_factory=dict)

    @property
    def waste_fraction(self) -> float:
        """Wasted device memory-time over total device memory-time."""
        return self.waste_fractions["waste_fraction"]


class ReplayEngine:
    """Drives one Scheduler over a scripted workload.

    Args:
        config: the scheduler's configuration (policy, pool sizes, token budget).
        cost: the cost model the scheduler sizes swaps and waste by.
        executor: runs each StepPlan (simulated or real).
        check_invariants: check block conservation after every step (tests; slow).
        token_ids: add requests and tool returns as token ids (the executor must then sample
            ids); None: as the executor does (its ``token_ids`` attribute, else counts only).
        seed: seeds the ids (``token_ids.py``) and the predictor's errors.
        prediction_error: when the config ranks by predicted work
            (``rank_s_per_predicted_token``), each request's remaining output is predicted at
            its arrival and at each tool return as the script's true count times
            exp(N(0, prediction_error)): a stand-in for a learned output-length predictor
            (LAMPS's), with its error set here (0: an exact one). Unused when the config
            learns output lengths itself (``learn_output_lengths``).
    """

    def __init__(self, config: SchedulerConfig, cost: CostModel, executor: Executor,
                 check_invariants: bool = False, token_ids: bool | None = None, seed: int = 0,
                 prediction_error: float = 0.0) -> None:
        predictor = OutputPredictor(seed, prediction_error)  # ValueError naming a bad error
        # With learn_output_lengths the core predicts from finished programs: no oracle then.
        ranked = config.rank_s_per_predicted_token > 0 and not config.learn_output_lengths
        self._predictor = predictor if ranked else None
        self.scheduler = Scheduler(config, cost)
        # The engine loop of the real engine, under a virtual clock: resumes and intercepts
        # queue in _events and cross to the core once per step each.
        self._events = CoreEvents(self.scheduler)
        self._loop = StepLoop(self.scheduler, executor, VirtualClock(), self._events)
        self._check = check_invariants
        self._policy = config.policy
        self._token_ids = getattr(executor, "token_ids", False) if token_ids is None else token_ids
        self._seed = seed
        self._vocab_size = config.vocab_size or SIM_VOCAB_SIZE
        self._awaiting_first_token: set[int] = set()  # resumed, no token of the new turn yet

    def run(self, requests: Sequence[WorkloadRequest], duration_s: float,
            max_time_s: float | None = None,
            on_step: Callable[[float], None] | None = None) -> ReplayResult:
        """Replays `requests` (their arrival_s set) and returns what happened.

        Args:
            requests: the workload, arrivals within [0, duration_s).
            duration_s: the arrival window; throughput is measured over it.
            max_time_s: stop the clock here even if requests are unfinished (default: run
                until every request finishes).
            on_step: called with the clock after every step (progress bars).
        """
        core = self.scheduler
        events: list[tuple[float, int, str, object]] = []  # (time_s, seq, kind, payload)
        seq = itertools.count()
        for request in requests:
            heapq.heappush(events, (request.arrival_s, next(seq), "arrive", request))
        progress: dict[int, _Progress] = {}
        aborted: dict[str, str] = {}
        limit_s = math.inf if max_time_s is None else max_time_s
        clock = self._loop.clock
        num_steps = 0
        num_idle_plans = 0  # empty plans in a row at one time

        while (events or core.num_live_requests) and clock.now_s < limit_s:
            now_s = clock.now_s
            while events and events[0][0] <= now_s:
                _, _, kind, payload = heapq.heappop(events)
                if kind == "arrive":
                    self._arrive(payload, now_s, progress)
                else:
                    self._tool_returns(payload, now_s, progress)
            _, result, output, now_s = self._loop.step()  # the token limits decide finishes
            if result is None:
                # Two empty plans in a row with nothing to wait for is a stall.
                for request_id, reason in zip(output.aborted, output.abort_reasons):
                    aborted[progress[request_id].request.request_id] = reason
                num_idle_plans += 1
                if events:
                    # Idle until the next event or the cut.
                    clock.now_s = min(max(clock.now_s, events[0][0]), limit_s)
                elif num_idle_plans > 1 and core.num_live_requests:
                    raise RuntimeError(
                        f"replay stalled at t={clock.now_s:.3f}s with {core.num_live_requests} live "
                        "requests and nothing schedulable; this is a scheduler bug")
                continue
            num_idle_plans = 0
            num_steps += 1
            if self._awaiting_first_token:
                self._note_resumed_ttfts(output.sampled, now_s, progress)
            for request_id in output.reached_limit:
                self._segment_done(request_id, now_s, progress, events, seq)
            self._events.flush()  # the step's intercepts, in one call
            for request_id, reason in zip(output.aborted, output.abort_reasons):
                aborted[progress[request_id].request.request_id] = reason
            if self._check:
                core.check_invariants()
            if on_step is not None:
                on_step(now_s)
        now_s = clock.now_s

        records = [self._record(core, rid, p) for rid, p in progress.items()]
        ledger = core.ledger()
        waste, waste_fractions = ledger.as_dict(), ledger.fractions()
        stats = core.stats()
        stat_names = [name for name in dir(stats) if name.startswith(("num_", "prefix_cache_"))]
        return ReplayResult(records=records, duration_s=duration_s, end_s=now_s, num_steps=num_steps,
                            waste=waste, waste_fractions=waste_fractions, stats={name: getattr(stats, name) for name in stat_names},
                            aborted=aborted)

    def _arrive(self, request: WorkloadRequest, now_s: float, progress: dict[int, _Progress]) -> None:
        # Limit 1 first: the first token's time is the request's TTFT.
        self._events.flush()  # the core's calls stay in the order the events came
        if self._token_ids:
            prompt = prompt_token_ids(request, self._seed, self._vocab_size)
            request_id = self.scheduler.add_request(prompt, request.arrival_s, 1)
        else:
            request_id = self.scheduler.add_request(request.prompt_tokens, request.arrival_s, 1)
        state = _Progress(request=request, segment_end_tokens=request.segments[0].completion_tokens)
        progress[request_id] = state
        self._predict(request_id, state)

    def _predict(self, request_id: int, state: _Progress) -> None:
        """Tells the core the output left over the request's remaining turns, as predicted."""
        if self._predictor is None:
            return
        remaining = sum(s.completion_tokens for s in state.request.segments[state.segment:])
        self.scheduler.set_predicted_output_tokens(request_id, self._predictor.predict(remaining))

    def _segment_done(self, request_id: int, now_s: float, progress: dict[int, _Progress],
                      events: list, seq: itertools.count) -> None:
        core = self.scheduler
        state = progress[request_id]
        if state.first_token_s is None:
            state.first_token_s = now_s
        generated = core.request(request_id).num_generated_tokens
        if generated < state.segment_end_tokens:
            core.set_generated_token_limit(request_id, state.segment_end_tokens)
            return
        segment = state.request.segments[state.segment]
        if segment.tool_duration_s is None:
            self._events.flush()  # intercepts queued before this finish go first
            core.finish(request_id)
            state.finish_s = now_s
            return
        # The model has called its tool: pause for the tool's time, hinting the duration as a
        # caller with a learned estimate would.
        self._events.intercept(request_id, now_s, segment.tool_duration_s, segment.tool or "")
        state.intercept_start_s = now_s
        heapq.heappush(events, (now_s + segment.tool_duration_s, next(seq), "resume", request_id))

    def _tool_returns(self, request_id: int, now_s: float, progress: dict[int, _Progress]) -> None:
        core = self.scheduler
        state = progress[request_id]
        segment = state.request.segments[state.segment]
        state.tool_time_s += now_s - state.intercept_start_s
        if self._token_ids:
            self._events.resume(request_id, tool_token_ids(state.request, state.segment, self._seed,
                                                           self._vocab_size), now_s)
        else:
            self._events.resume(request_id, segment.tool_tokens, now_s)
        state.segment += 1
        state.segment_end_tokens += state.request.segments[state.segment].completion_tokens
        core.set_generated_token_limit(request_id, state.segment_end_tokens)
        self._predict(request_id, state)
        state.resume_s = now_s
        self._awaiting_first_token.add(request_id)

    def _note_resumed_ttfts(self, sampled: list[int], now_s: float, progress: dict[int, _Progress]) -> None:
        """Resumed requests that sampled this step: their new turn's first token came now."""
        for request_id in self._awaiting_first_token.intersection(sampled):
            state = progress[request_id]
            state.resumed_ttfts_s.append(now_s - state.resume_s)
            state.resume_s = None
            self._awaiting_first_token.discard(request_id)

    @staticmethod
    def _record(core: Scheduler, request_id: int, state: _Progress) -> RequestRecord:
        generated = core.request(request_id).num_generated_tokens
        return RequestRecord(request_id=state.request.request_id, arrival_s=state.request.arrival_s,
                             first_token_s=state.first_token_s, finish_s=state.finish_s,
                             num_output_tokens=generated, tool_time_s=state.tool_time_s,
                             resumed_ttfts_s=tuple(state.resumed_ttfts_s))


def simulated_config(cost: CostModel, policy: Policy | str, block_size: int = 16,
                     host_to_device_ratio: float = 2.0, max_running_requests: int = 256) -> SchedulerConfig:
    """A scheduler configuration sized from a cost profile's KV capacity.

    Args:
        cost: the profile; its kv_capacity_tokens sizes the device pool.
        policy: a Policy or its name.
        block_size: tokens per KV block.
        host_to_device_ratio: host (pinned) pool size as a multiple of the device pool.
        max_running_requests: cap on the batch's requests.
    """
    config = SchedulerConfig()
    config.policy = Policy.parse(policy) if isinstance(policy, str) else policy
    config.block_size = block_size
    config.num_device_blocks = int(cost.kv_capacity_tokens // block_size)
    config.num_host_blocks = int(config.num_device_blocks * host_to_device_ratio)
    config.max_batched_tokens = cost.saturation_tokens
    config.max_running_requests = max_running_requests
    config.build_batch = False  # no forward runs: the flat inputs would be built for nothing
    return config
