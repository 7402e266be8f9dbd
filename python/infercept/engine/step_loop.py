"""The one engine loop step (DESIGN.md §3), shared by the real engine and the simulator.

``StepLoop.step()`` is schedule -> execute -> decide finishes -> update over one scheduler, one
executor (the Executor protocol: the model runner, or the simulated executor) and one clock:

    core events: queued resumes, then intercepts -> scheduler (one call each, batched)
    scheduler.schedule(clock.now())             -> StepPlan
    executor.execute(plan)                      -> StepResult
    clock.advance(result.duration_s)            (a virtual clock moves; the wall clock has)
    decide_finished(plan, result, now)          -> result.finished (the caller's stop rules)
    scheduler.update(plan, result, now)         -> StepOutput

``LLMEngine.step`` (wall clock, tool runtime, detokenizer) and ``bench.replay.ReplayEngine``
(virtual clock, scripted tool calls) each drive it; what they do around it (tool calls,
arrivals, idle waits) is theirs. Resumes and intercepts do not cross to the core one by one:
they queue in ``CoreEvents`` and cross once per kind when the loop flushes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from infercept._core import InvalidArgumentError, Scheduler, StepOutput, StepPlan, StepResult
from infercept.engine.executor import Executor


class WallClock:
    """Seconds since construction; an executed step has already taken its time."""

    def __init__(self) -> None:
        self._start_s = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._start_s

    def advance(self, duration_s: float) -> float:  # noqa: ARG002 (the wall clock moved itself)
        return self.now()


class VirtualClock:
    """Simulated seconds: moved by each step's reported duration and by idle jumps."""

    def __init__(self, now_s: float = 0.0) -> None:
        self.now_s = now_s

    def now(self) -> float:
        return self.now_s

    def advance(self, duration_s: float) -> float:
        self.now_s += duration_s
        return self.now_s


class CoreEvents:
    """Resumes and intercepts queued for the scheduler, sent as one batched call per kind.

    The order of the core's calls is kept: ``flush()`` sends the intercepts, then the resumes
    (a request paused and resumed before one flush is paused first), and a caller that makes
    any other state-changing core call (abort, finish, add_request) flushes first.

    Args:
        scheduler: The core.
        on_error: Called with (request_id, message) for a resume the core refused (it has
            aborted the request when the context outgrew a limit); None: raise
            InvalidArgumentError with the core's message, after the rest of the batch applied.
    """

    def __init__(self, scheduler: Scheduler,
                 on_error: Callable[[int, str], None] | None = None) -> None:
        self.scheduler = scheduler
        self._on_error = on_error
        # Intercepts: parallel lists, as intercept_batch takes them; callbacks get the state.
        self._intercept_ids: list[int] = []
        self._intercept_now_s: list[float] = []
        self._intercept_expected_s: list[float] = []
        self._intercept_tools: list[str] = []
        self._on_state: list[Callable[[str], None] | None] = []
        self._resume_ids: list[int] = []
        self._resume_now_s: list[float] = []
        self._resume_tokens: list = []  # list[int] per request, or an int count (counts only)
        self._resume_replaced: list[int] = []

    @property
    def pending(self) -> bool:
        """Whether anything is queued."""
        return bool(self._intercept_ids or self._resume_ids)

    def intercept(self, request_id: int, now_s: float, expected_duration_s: float = -1.0,
                  tool_name: str = "",
                  on_state: Callable[[str], None] | None = None) -> None:
        """Queues ``Scheduler.intercept``; ``on_state`` gets the label of the policy's first
        KV state (``RequestState.label``: 'preserved', 'swapping_out', 'discarded')."""
        self._intercept_ids.append(request_id)
        self._intercept_now_s.append(now_s)
        self._intercept_expected_s.append(expected_duration_s)
        self._intercept_tools.append(tool_name)
        self._on_state.append(on_state)

    def resume(self, request_id: int, tool_tokens: Sequence[int] | int, now_s: float,
               num_replaced_tokens: int = 0) -> None:
        """Queues ``Scheduler.resume``: the tool's token ids, or a token count (counts only)."""
        self._resume_ids.append(request_id)
        self._resume_now_s.append(now_s)
        self._resume_tokens.append(tool_tokens)
        self._resume_replaced.append(num_replaced_tokens)

    def flush(self) -> None:
        """Sends the queued intercepts, then the queued resumes (one core call each, if any).

        Raises:
            StateError: An intercept of a request that has not just sampled (none of the
                batch applied; the queue is emptied either way).
        """
        if self._intercept_ids:
            ids, now_s = self._intercept_ids, self._intercept_now_s
            expected_s, tools, callbacks = self._intercept_expected_s, self._intercept_tools, self._on_state
            self._intercept_ids, self._intercept_now_s = [], []
            self._intercept_expected_s, self._intercept_tools, self._on_state = [], [], []
            labels = self.scheduler.intercept_batch(ids, now_s, expected_s, tools)
            for callback, label in zip(callbacks, labels):
                if callback is not None:
                    callback(label)
        if self._resume_ids:
            ids, now_s = self._resume_ids, self._resume_now_s
            tokens, replaced = self._resume_tokens, self._resume_replaced
            self._resume_ids, self._resume_now_s = [], []
            self._resume_tokens, self._resume_replaced = [], []
            if isinstance(tokens[0], int):  # counts only: every request of one core is alike
                errors = self.scheduler.resume_batch(ids, now_s, tokens)
            else:
                errors = self.scheduler.resume_batch(ids, now_s, tokens, replaced)
            for request_id, error in zip(ids, errors):
                if error:
                    if self._on_error is None:
                        raise InvalidArgumentError(error)  # as the one-by-one resume raised
                    self._on_error(request_id, error)


class StepLoop:
    """Drives one scheduler and one executor under one clock, a step at a time.

    Args:
        scheduler: The core.
        executor: Runs the plans (Executor protocol).
        clock: ``WallClock`` (the engine) or ``VirtualClock`` (the simulator).
        events: The queue of resumes and intercepts (one per scheduler).
    """

    def __init__(self, scheduler: Scheduler, executor: Executor,
                 clock: WallClock | VirtualClock, events: CoreEvents) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.clock = clock
        self.events = events

    def step(self, decide_finished: Callable[[StepPlan, StepResult, float], list[int]] | None = None
             ) -> tuple[StepPlan, StepResult | None, StepOutput, float]:
        """Flushes the queued core events, then schedules, executes and applies one step.

        Args:
            decide_finished: Given the plan, the executor's result and the clock after it, the
                requests that stop now (``result.finished``); None: none do (the core's token
                limits decide).

        Returns:
            ``(plan, result, output, now_s)``: what the scheduler planned, what the executor
            reported (None when the plan was empty and nothing ran), what ``update()``
            reported, and the clock when the step was applied. A plain tuple: the simulator
            runs this tens of thousands of times a simulated minute.
        """
        events = self.events
        if events._intercept_ids or events._resume_ids:  # most steps queue nothing
            events.flush()
        scheduler = self.scheduler
        plan = scheduler.schedule(self.clock.now())
        if plan.is_empty():
            # Applied like any plan: planning may have moved blocks without a copy (a swap-in
            # whose blocks were still cached on the device) or given up on a request.
            now_s = self.clock.now()
            return plan, None, scheduler.update(plan, StepResult(0.0), now_s), now_s
        result = self.executor.execute(plan)
        now_s = self.clock.advance(result.duration_s)
        if decide_finished is not None:
            result.finished = decide_finished(plan, result, now_s)
        return plan, result, scheduler.update(plan, result, now_s), now_s
