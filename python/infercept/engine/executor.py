"""The executor protocol (DESIGN.md §3): the one interface between the engine loop and compute.

An executor takes one StepPlan, runs its forward and its planned block copies, and reports a
StepResult: the token each sampling request drew (``plan.sampling_request_ids`` order), the
step's duration and the part of it spent stalled on copies. The model runner
(:class:`infercept.engine.model_runner.ModelRunner`) and the simulator's
:class:`infercept.bench.executor.SimulatedExecutor` both implement it; the engine loop never
knows which one it drives.
"""

from __future__ import annotations

from typing import Protocol

from infercept._core import StepPlan, StepResult


class Executor(Protocol):
    """Runs the plans of one scheduler."""

    def execute(self, plan: StepPlan) -> StepResult:
        """Runs one iteration: the forward of the plan's batch and the copies of plan.swap_*.

        The result's ``finished`` is left empty: which requests stop is the engine's call.
        """
        ...
