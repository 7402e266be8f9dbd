"""The simulated executor: the Executor protocol (infercept.engine.executor) without a model.

The real executor (the model runner) runs the forward and the block copies of a StepPlan and
reports a StepResult; the simulated one runs nothing and says how long the step would take on
the profiled machine.
"""

from __future__ import annotations

from infercept._core import CostModel, StepPlan, StepResult
from infercept.bench.token_ids import SIM_VOCAB_SIZE, sampled_token_id


class SimulatedExecutor:
    """Advances a virtual clock by the cost model and, for requests with token ids, samples.

    A step takes T_fwd(B) for B batched tokens (plus the profile's attention term over the
    batch's context tokens, when it has one). Swaps run pipelined beside the forward, each
    direction on its own copy stream: the forward waits only for the part of the longer
    direction that T_fwd(B) cannot hide (that wait is the swap stall).

    With ``token_ids`` every sampling request draws ``sampled_token_id(seed, id, position)``
    (position: the index the new token takes in the request's sequence), in plan order, as the
    core requires of requests that carry ids; without, the result carries no ids (the core's
    counts-only path).
    """

    def __init__(self, cost: CostModel, block_size: int, token_ids: bool = False, seed: int = 0,
                 vocab_size: int = SIM_VOCAB_SIZE) -> None:
        self._cost = cost
        self._block_size = block_size
        self._token_ids = token_ids
        self._seed = seed
        self._vocab_size = vocab_size

    @property
    def token_ids(self) -> bool:
        """Whether this executor samples ids (the replay then adds requests as ids)."""
        return self._token_ids

    def execute(self, plan: StepPlan) -> StepResult:
        forward_s = 0.0
        if plan.num_batched_tokens:
            forward_s = self._cost.step_time_s(plan.num_batched_tokens, plan.num_context_tokens)
        num_copy_tokens = max(plan.num_swap_out_blocks, plan.num_swap_in_blocks) * self._block_size
        swap_s = self._cost.swap_time_s(num_copy_tokens)
        stall_s = max(0.0, swap_s - forward_s)
        result = StepResult(duration_s=forward_s + stall_s, swap_stall_s=stall_s)
        if self._token_ids and plan.num_sampling_requests:
            seed, vocab = self._seed, self._vocab_size
            result.sampled_token_ids = [
                sampled_token_id(seed, request_id, position, vocab)
                for request_id, position in zip(plan.sampling_request_ids.tolist(),
                                                plan.sampling_positions.tolist())]
        return result
