"""Replays an augmented workload on the real engine under the wall clock.

Each trace request becomes a real request: seeded prompt ids of its token count (its app's
shared prefix first, as in the simulator: ``token_ids.py``), one scripted intercept per tool call (paused for the call's duration, resumed with the tool's token count)
and ``ignore_eos`` so it decodes exactly its segments' tokens. Requests arrive at their
``arrival_s`` on the engine's clock; the engine steps whenever it has work and sleeps until the
next arrival when it has none. Metrics come from per-request timestamps and the native waste
ledger, as in the simulator (``replay.py``), so the two can be compared row by row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from infercept.engine import LLMEngine
from infercept.bench.metrics import RequestRecord
from infercept.bench.replay import OutputPredictor
from infercept.bench.token_ids import prompt_token_ids
from infercept.sampling import SamplingParams, ScriptedIntercept
from infercept.bench.workload import WorkloadRequest


@dataclass
class RealReplayResult:
    """Per-request records, the waste breakdown and the engine's counters of one run."""

    records: list[RequestRecord]
    duration_s: float
    end_s: float
    waste: dict[str, float]            # WasteLedger.as_dict
    waste_fractions: dict[str, float]  # WasteLedger.fractions
    stats: dict[str, float]


def to_engine_request(request: WorkloadRequest, vocab_size: int, seed: int,
                      time_scale: float = 1.0) -> tuple[list[int], SamplingParams]:
    """A trace request as prompt tokens and sampling parameters with its scripted intercepts.

    Args:
        request: The template (counts and tool durations).
        vocab_size: Prompt tokens are drawn from ``[100, vocab_size)``, past special tokens.
        seed: Seeds the prompt's tokens (with the request id and, for the shared prefix, the app).
        time_scale: Multiplies every tool duration (shrinks a trace to a short run).
    """
    prompt = prompt_token_ids(request, seed, vocab_size)
    intercepts, generated = [], 0
    for segment in request.segments[:-1]:
        generated += segment.completion_tokens
        duration = float(segment.tool_duration_s or 0.0) * time_scale
        if segment.tool_tokens:
            intercepts.append(ScriptedIntercept(generated, duration, num_tokens=segment.tool_tokens))
        else:
            intercepts.append(ScriptedIntercept(generated, duration, text=" "))
    total = generated + request.segments[-1].completion_tokens
    return prompt, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=total,
                                  intercepts=intercepts)


def replay(engine: LLMEngine, requests: Sequence[WorkloadRequest], duration_s: float, *,
           time_scale: float = 1.0, seed: int = 0,
           on_step: Callable[[int, int], None] | None = None,
           on_tick: Callable[[float], None] | None = None,
           max_time_s: float | None = None, prediction_error: float | None = None) -> RealReplayResult:
    """Runs ``requests`` (arrival_s set, in seconds) on ``engine`` and returns what happened.

    Args:
        engine: A fresh engine (its waste ledger is reported as the run's).
        requests: Arrivals within ``[0, duration_s)``.
        duration_s: The arrival window; throughput is measured over it.
        time_scale: Multiplies tool durations (arrival times are used as given).
        seed: Seeds the prompts.
        on_step: Called with (finished, total) after every step (progress bars).
        on_tick: Called with the run's elapsed seconds after every step (memory timelines:
            read ``engine.scheduler.stats()`` in it).
        max_time_s: Stop stepping here even if requests are unfinished (they are reported
            unfinished; the engine's shutdown aborts them).
        prediction_error: None: no predictions. Else each request arrives with its output
            over all turns predicted as the script's count times exp(N(0, prediction_error)),
            for an engine that ranks by predicted work (``rank_s_per_predicted_token``); the
            prediction is made once, at arrival.
    """
    pending = sorted(requests, key=lambda r: r.arrival_s)
    predictions = _predictions(pending, seed, prediction_error)
    prepared = [to_engine_request(r, engine.model.config.vocab_size, seed, time_scale) for r in pending]
    ids: dict[int, WorkloadRequest] = {}
    turns = _TurnClock()
    live: set[int] = set()  # added, not finished: whose turns are watched
    start = engine.now()
    next_arrival = 0
    while next_arrival < len(pending) or engine.has_unfinished():
        now = engine.now() - start
        if max_time_s is not None and now >= max_time_s:
            break
        while next_arrival < len(pending) and pending[next_arrival].arrival_s <= now:
            prompt, params = prepared[next_arrival]
            request_id = engine.add_request(prompt_token_ids=prompt, params=params,
                                            predicted_output_tokens=predictions[next_arrival])
            ids[request_id] = pending[next_arrival]
            live.add(request_id)
            next_arrival += 1
        if engine.has_unfinished():
            engine.step()
            turns.observe([engine.get(i) for i in live], engine.now() - start)
            live.difference_update([i for i in live if engine.get(i).finished])
        elif next_arrival < len(pending):
            time.sleep(max(0.0, pending[next_arrival].arrival_s - (engine.now() - start)))
        if on_step is not None:
            on_step(sum(engine.get(i).finished for i in ids), len(pending))
        if on_tick is not None:
            on_tick(engine.now() - start)
    end = engine.now() - start
    records = []
    for request_id, request in ids.items():
        out = engine.get(request_id)
        records.append(RequestRecord(
            request_id=request.request_id, arrival_s=out.arrival_s - start,
            first_token_s=None if out.first_token_s is None else out.first_token_s - start,
            finish_s=None if out.finish_s is None else out.finish_s - start,
            num_output_tokens=out.num_generated_tokens, tool_time_s=out.tool_time_s,
            resumed_ttfts_s=tuple(turns.resumed_ttfts_s.get(request_id, ()))))
    ledger = engine.scheduler.ledger()
    return RealReplayResult(records, duration_s, end, ledger.as_dict(), ledger.fractions(), engine.stats)


def _predictions(requests: Sequence[WorkloadRequest], seed: int,
                 error: float | None) -> list[int | None]:
    """Each request's predicted output (None without a predictor), as ReplayEngine draws them."""
    if error is None:
        return [None] * len(requests)
    predictor = OutputPredictor(seed, error)
    return [predictor.predict(r.num_output_tokens) for r in requests]


class _TurnClock:
    """Resumed-turn TTFTs from the engine's reports: tool return -> the turn's first token.

    Read after every step: a request whose last intercept is open is paused (noted with its
    generated count). Once that intercept has closed (its ``duration_s`` is set) the tool
    returned at pause + duration, and the first report with more generated tokens than at the
    pause is the new turn's first token (a one-token turn may already be paused again by
    then). Times are as coarse as a step.
    """

    def __init__(self) -> None:
        # id -> (when the pause was seen, generated tokens then, index of the intercept)
        self._paused_at: dict[int, tuple[float, int, int]] = {}
        self.resumed_ttfts_s: dict[int, list[float]] = {}

    def observe(self, outputs: list, now_s: float) -> None:
        for out in outputs:
            seen = self._paused_at.get(out.request_id)
            if seen is not None:
                pause_s, generated, index = seen
                duration_s = out.intercepts[index].duration_s
                if duration_s is None or out.num_generated_tokens <= generated:
                    continue
                self.resumed_ttfts_s.setdefault(out.request_id, []).append(
                    max(0.0, now_s - pause_s - duration_s))
                del self._paused_at[out.request_id]
            if out.intercepts and out.intercepts[-1].duration_s is None:
                self._paused_at[out.request_id] = (now_s, out.num_generated_tokens, len(out.intercepts) - 1)
