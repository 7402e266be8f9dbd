"""The simulated executor: the Executor protocol (infercept.engine.executor) without a model.

The real executor (the model runner) runs the forward and the block copies of a StepPlan and
reports a StepResult; the simulated one runs nothing and says how long the step would take on
the profiled machine.
"""

from __future__ import annotations

from infercept._core import CostModel, StepPlan, StepResult


class SimulatedExecutor:
    """Advances a virtual clock by the cost model; emits no tokens (the core counts them).

    A step takes T_fwd(B) for B batched tokens (plus the profile's attention term over the
    batch's context tokens, when it has one). Swaps run pipelined beside the forward, each
    direction on its own copy stream: the forward waits only for the part of the longer
    direction that T_fwd(B) cannot hide (that wait is the swap stall).
    """

    def __init__(self, cost: CostModel, block_size: int) -> None:
        self._cost = cost
        self._block_size = block_size

    def execute(self, plan: StepPlan) -> StepResult:
        forward_s = 0.0
        if plan.num_batched_tokens:
            forward_s = self._cost.step_time_s(plan.num_batched_tokens, plan.num_context_tokens)
        num_copy_tokens = max(plan.num_swap_out_blocks, plan.num_swap_in_blocks) * self._block_size
        swap_s = self._cost.swap_time_s(num_copy_tokens)
        stall_s = max(0.0, swap_s - forward_s)
        return StepResult(duration_s=forward_s + stall_s, swap_stall_s=stall_s)
