"""Property tests for the native scheduler (DESIGN.md §6): random arrivals, intercepts, resumes,
aborts, finishes and steps under every policy and small pools, with the core's bookkeeping
checked from the outside after every operation and every request driven to an end.

One state machine per policy. Each example draws a small configuration (pools of a few blocks,
so preemption, swapping and reclaiming happen all the time), runs up to `STEP_COUNT` rules, then
drains: no new work, every paused request resumed, steps until every request has finished or
been aborted, after which both pools must be wholly free.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from infercept._core import (
    AffineFit,
    CostModel,
    Tier,
    InvalidArgumentError,
    Policy,
    RequestState,
    Scheduler,
    SchedulerConfig,
    StepResult,
)

POLICIES = Policy.all()  # every row of the core's policy table
# Tools the intercepts name: continuum learns a TTL per tool from their observed durations.
TOOL_NAMES = ["", "grep", "build"]
MAX_EXAMPLES_PER_POLICY = 40
STEP_COUNT = 200
# Slack on top of the steps one request can need to end once it is the oldest (see drain_limit).
DRAIN_SLACK_STEPS = 1_000
# Consecutive empty plans with nothing paused on a tool: the state cannot change any more.
MAX_IDLE_STEPS = 50

TERMINAL = (RequestState.FINISHED, RequestState.ABORTED)
COMPUTING = (RequestState.RUNNING, RequestState.RECOMPUTING)

# Counts every schedule()/update() pair the tests run, drains included (reported at the end).
STEP_TOTALS = {"steps": 0, "examples": 0}

_PICK = st.integers(min_value=0, max_value=2**16)


def _affine(intercept_s: float, slope_s_per_token: float) -> AffineFit:
    fit = AffineFit()
    fit.intercept_s = intercept_s
    fit.slope_s_per_token = slope_s_per_token
    return fit


@st.composite
def cost_models(draw) -> CostModel:
    """The paper's GPT-J profile, or a small one whose swap budget spans 0 to many blocks."""
    if draw(st.booleans()):
        return CostModel.builtin("gptj-6b-a100")
    cost = CostModel()
    cost.name = "property-test"
    cost.forward = _affine(draw(st.sampled_from([0.0, 0.005, 0.02])), draw(st.sampled_from([0.0, 1e-4, 1e-3])))
    cost.swap = _affine(draw(st.sampled_from([0.0, 0.001, 0.05])), draw(st.sampled_from([0.0, 1e-4, 2e-3, 0.05])))
    cost.kv_bytes_per_token = draw(st.sampled_from([1, 1024, 1 << 20]))
    cost.saturation_tokens = draw(st.sampled_from([1, 64, 512]))
    cost.kv_capacity_tokens = draw(st.sampled_from([0, 64, 100_000]))
    return cost


class SchedulerMachine(RuleBasedStateMachine):
    """Drives one Scheduler; keeps its own record of what each request should hold."""

    policy: Policy = Policy.INFERCEPT

    def __init__(self) -> None:
        super().__init__()
        self.scheduler: Scheduler | None = None
        self.now_s = 0.0
        # id -> {"prompt", "generated", "tool"}: what the test has caused, for token accounting.
        self.model: dict[int, dict[str, int]] = {}
        self.allowed_aborts: set[int] = set()  # aborted by the test or reported by update()
        self.finished_by_test: set[int] = set()
        self.removed: set[int] = set()
        self.settled: set[int] = set()  # terminal and checked once: they cannot change any more
        self.num_steps = 0
        self.num_intercepts = 0

    # ---- setup --------------------------------------------------------------------------------

    @initialize(
        block_size=st.integers(1, 16),
        num_device_blocks=st.sampled_from([8, 8, 9, 12, 16, 24, 32, 64]),
        num_host_blocks=st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64]),
        max_batched_tokens=st.integers(1, 64),
        max_running_requests=st.integers(1, 8),
        cost=cost_models(),
    )
    def setup(self, block_size, num_device_blocks, num_host_blocks, max_batched_tokens, max_running_requests, cost):
        config = SchedulerConfig()
        config.policy = self.policy
        config.block_size = block_size
        config.num_device_blocks = num_device_blocks
        config.num_host_blocks = num_host_blocks
        config.max_batched_tokens = max_batched_tokens
        config.max_running_requests = max_running_requests
        self.config = config
        self.cost = cost
        self.scheduler = Scheduler(config, cost)
        self.max_prompt_tokens = num_device_blocks * block_size - 1  # prompt + 1 token fit the pool

    # ---- helpers ------------------------------------------------------------------------------

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def live_ids(self) -> list[int]:
        return sorted(i for i in self.model if i not in self.settled and self.scheduler.request(i).state not in TERMINAL)

    def ids_where(self, predicate) -> list[int]:
        return [i for i in self.live_ids() if predicate(self.scheduler.request(i))]

    @staticmethod
    def just_sampled(r) -> bool:
        return r.state == RequestState.RUNNING and r.num_tokens - r.num_computed_tokens == 1

    def tables(self) -> dict[int, tuple[list[int], list[int]]]:
        out = {}
        for i in self.model:
            if i in self.settled:
                continue
            r = self.scheduler.request(i)
            out[i] = (list(r.device_blocks), list(r.host_blocks))
        return out

    sharing = False  # requests carry token ids, so blocks may be shared through the cache

    def check_blocks(self, copy_sources=((), ()), in_flight: bool = False):
        """Every block's reference count is its table entries (plus a pending copy's read);
        free (evictable included) + referenced == pool size; evictable iff unreferenced and
        cached. Without token ids no block is in two tables."""
        tables = self.tables()
        for tier_index, tier, total, free in (
            (0, Tier.DEVICE, self.config.num_device_blocks, self.scheduler.num_free_device_blocks),
            (1, Tier.HOST, self.config.num_host_blocks, self.scheduler.num_free_host_blocks),
        ):
            pool = self.scheduler.pool(tier)
            holders: dict[int, list[int]] = {}
            for i, blocks in tables.items():
                for b in blocks[tier_index]:
                    assert 0 <= b < total, f"request {i} holds tier-{tier_index} block {b} outside [0, {total})"
                    holders.setdefault(b, []).append(i)
            sources = set(copy_sources[tier_index])
            for b, who in holders.items():
                assert self.sharing or len(who) == 1, f"tier-{tier_index} block {b} held by requests {who}"
                assert len(set(who)) == len(who), f"request {who[0]} holds tier-{tier_index} block {b} twice"
            if not in_flight:  # pending releases also hold a reference while a plan is out
                for b in range(total):
                    expected = len(holders.get(b, ()))
                    assert pool.ref_count(b) == expected, (
                        f"tier-{tier_index} block {b}: {pool.ref_count(b)} references, {expected} table entries")
                    assert pool.is_evictable(b) == (expected == 0 and pool.is_cached(b))
            referenced = set(holders) | sources
            assert free + len(referenced) <= total and (
                (in_flight and self.sharing) or free + len(referenced) == total), (
                f"tier {tier_index}: {free} free + {len(referenced)} referenced != {total} blocks"
            )
        return tables

    def record_aborts(self, out) -> None:
        assert len(out.aborted) == len(out.abort_reasons)
        for i, reason in zip(out.aborted, out.abort_reasons):
            assert reason, f"request {i} aborted without a reason"
            assert self.scheduler.request(i).state == RequestState.ABORTED
            self.allowed_aborts.add(i)

    def step(self, duration_factor: float = 1.0, stall_fraction: float = 0.0, finish_sampled: bool = False,
             inflight=None) -> tuple[object, object]:
        """One schedule()/update() pair with plan checks; `inflight(plan)` runs between them."""
        s = self.scheduler
        plan = s.schedule(self.now_s)
        self.check_plan(plan)
        if inflight is not None:
            inflight(plan)
            s.check_invariants()
        duration_s = max(0.0, self.cost.forward_time_s(plan.num_batched_tokens)) * duration_factor + 1e-4
        stall_s = duration_s * stall_fraction if (plan.swap_out or plan.swap_in) else 0.0
        sampling = [x.request_id for x in plan.scheduled if x.samples]
        finished = []
        if finish_sampled:
            # Requests that this step gives their second (or later) token and that stop there.
            finished = [
                i for i in sampling
                if s.request(i).state in COMPUTING and s.request(i).num_generated_tokens >= 1
            ][:1]
        self.now_s += duration_s
        sampled_ids = self.sample(sampling)
        out = s.update(plan, StepResult(duration_s, stall_s, finished, sampled_ids), self.now_s)
        self.num_steps += 1
        STEP_TOTALS["steps"] += 1
        self.record_aborts(out)
        for i in finished:
            assert s.request(i).state == RequestState.FINISHED
            self.finished_by_test.add(i)
        assert len(set(out.sampled)) == len(out.sampled)
        for i in out.sampled:
            assert i in sampling, f"request {i} sampled without a sampling chunk in the plan"
            self.model[i]["generated"] += 1
        for i in sampling:
            if i not in out.sampled:
                r = s.request(i)
                assert r.state in TERMINAL, f"request {i} had a sampling chunk but did not sample ({r.state})"
            elif i not in finished:
                r = s.request(i)
                assert r.state == RequestState.RUNNING, f"request {i} sampled but is {r.state}"
                assert r.num_tokens - r.num_computed_tokens == 1
        for i in out.reached_limit:
            r = s.request(i)
            assert i in out.sampled and r.generated_token_limit > 0
            assert r.num_generated_tokens >= r.generated_token_limit
        self.check_blocks()
        return plan, out

    def core_add(self, num_prompt_tokens: int, limit: int, pick: int) -> int:
        return self.scheduler.add_request(num_prompt_tokens, self.now_s, limit)

    def core_resume(self, i: int, num_tool_tokens: int) -> None:
        self.scheduler.resume(i, num_tool_tokens, self.now_s)

    def sample(self, sampling: list[int]) -> list[int]:
        """The sampled token ids for the step (counts only: none)."""
        return []

    def check_plan(self, plan) -> None:
        s = self.scheduler
        cfg = self.config
        # Host stores (vLLM-style offload of computed blocks) read a cached device block that may
        # be nobody's (evictable, counted free) into a host block that is nobody's either.
        held_on_host = {b for _, host in self.tables().values() for b in host}
        stores = [c for c in plan.swap_out if c.dst not in held_on_host]
        assert not stores or self.policy == Policy.VLLM_V1_OFFLOAD, f"swap-outs to unheld host blocks: {stores}"
        store_sources = {c.src for c in stores}
        tables = self.check_blocks(([c.src for c in plan.swap_out if c.src not in store_sources or
                                     self.scheduler.pool(Tier.DEVICE).ref_count(c.src) > 0],
                                    [c.src for c in plan.swap_in]), in_flight=True)
        assert plan.num_batched_tokens == sum(x.num_new_tokens for x in plan.scheduled)
        assert plan.num_batched_tokens <= cfg.max_batched_tokens
        assert plan.num_recompute_tokens == sum(x.num_recompute_tokens for x in plan.scheduled)
        assert plan.num_sampling_requests == sum(x.samples for x in plan.scheduled)
        ids = [x.request_id for x in plan.scheduled]
        assert len(set(ids)) == len(ids), f"a request is scheduled twice: {ids}"
        assert len(ids) <= cfg.max_running_requests
        padded_tables = plan.block_tables
        assert padded_tables.shape[0] == len(plan.scheduled)
        for row, x in enumerate(plan.scheduled):
            r = s.request(x.request_id)
            assert r.state in COMPUTING, f"scheduled request {r.id} is {r.state}"
            assert x.num_new_tokens > 0
            assert 0 <= x.num_recompute_tokens <= x.num_new_tokens
            assert r.num_computed_tokens == x.num_computed_tokens + x.num_new_tokens
            assert x.samples == (r.num_computed_tokens == r.num_tokens)
            # The plan's padded table row: the request's blocks, then zeros.
            table = padded_tables[row, :self.num_blocks(x.num_computed_tokens + x.num_new_tokens)].tolist()
            assert not padded_tables[row, len(table):].any()
            assert table == tables[r.id][0], (
                f"request {r.id}'s scheduled block table {table} is not its own {tables[r.id][0]}"
            )
        device_owner = {b: i for i, (dev, _) in tables.items() for b in dev}
        host_owner = {b: i for i, (_, host) in tables.items() for b in host}
        for c in plan.swap_out:
            if c.dst not in host_owner and self.policy == Policy.VLLM_V1_OFFLOAD:
                # A host store of a computed block (vLLM's offloading): the copy is nobody's
                # (the host's LRU cache), its source a block whose content is cached.
                assert s.pool(Tier.DEVICE).is_cached(c.src), f"host store of uncached device block {c.src}"
                continue
            # With a cache, a swap-out source stays findable: a later admission may take it.
            assert self.sharing or c.src not in device_owner, (
                f"swap-out source {c.src} is still held by {device_owner.get(c.src)}")
            assert c.dst in host_owner, f"swap-out destination {c.dst} is held by no request"
            assert s.request(host_owner[c.dst]).state == RequestState.SWAPPING_OUT
        for c in plan.swap_in:
            # Host blocks may be shared (cache hits): another sharer can still hold the source.
            assert self.sharing or c.src not in host_owner, (
                f"swap-in source {c.src} is still held by {host_owner.get(c.src)}")
            assert c.dst in device_owner, f"swap-in destination {c.dst} is held by no request"
            assert s.request(device_owner[c.dst]).state == RequestState.SWAPPING_IN
        assert len({c.src for c in plan.swap_out}) == len(plan.swap_out)
        # Two sharers of a host block may each bring it in the same step (update() then keeps one).
        assert self.sharing or len({c.src for c in plan.swap_in}) == len(plan.swap_in)
        for i in plan.preempted:
            r = s.request(i)
            assert r.state in (RequestState.SWAPPING_OUT, RequestState.DISCARDED), f"preempted {i} is {r.state}"
            assert not r.tool_pending
        for i in plan.discarded:
            r = s.request(i)
            assert r.state in (RequestState.DISCARDED, RequestState.ABORTED)
            assert not tables[i][0] and not tables[i][1], f"discarded request {i} still holds blocks"

    # ---- rules --------------------------------------------------------------------------------

    @precondition(lambda self: self.scheduler is not None)
    @rule(
        kinds=st.lists(st.sampled_from(["small", "medium", "medium", "near_max", "max", "over"]), min_size=1, max_size=3),
        pick=_PICK,
        limit=st.sampled_from([0, 0, 1, 3]),
    )
    def add_requests(self, kinds, pick, limit):
        for kind in kinds:
            self.add_one(kind, pick, limit)
            pick = pick * 31 + 7

    def add_one(self, kind: str, pick: int, limit: int) -> None:
        bs = self.config.block_size
        max_prompt = self.max_prompt_tokens
        if kind == "small":
            prompt = 1 + pick % (2 * bs)
        elif kind == "medium":
            prompt = 1 + pick % max(1, max_prompt // 2)
        elif kind == "near_max":
            prompt = max(1, max_prompt - pick % (2 * bs))
        elif kind == "max":
            prompt = max_prompt
        else:
            prompt = max_prompt + 1 + pick % (2 * bs)
        if prompt > max_prompt:
            with pytest.raises(InvalidArgumentError):
                self.core_add(prompt, limit, pick)
            return
        i = self.core_add(prompt, limit, pick)
        assert i not in self.model and i not in self.removed
        self.model[i] = {"prompt": prompt, "generated": 0, "tool": 0}
        r = self.scheduler.request(i)
        assert r.state == RequestState.WAITING and r.num_computed_tokens == 0

    @precondition(lambda self: self.scheduler is not None)
    @rule(pick=_PICK, expected=st.sampled_from([-1.0, -1.0, 0.0, 0.01, 0.5, 5.0, 100.0]),
          tool=st.sampled_from(TOOL_NAMES))
    def intercept(self, pick, expected, tool):
        ids = self.ids_where(self.just_sampled)
        if not ids:
            return
        i = ids[pick % len(ids)]
        self.scheduler.intercept(i, self.now_s, expected, tool)
        r = self.scheduler.request(i)
        assert r.tool_pending
        assert r.state in (RequestState.PRESERVED, RequestState.SWAPPING_OUT, RequestState.DISCARDED)

    def resume_one(self, i: int, num_tool_tokens: int) -> None:
        s = self.scheduler
        r = s.request(i)
        new_total = r.num_tokens + num_tool_tokens
        too_big = self.num_blocks(new_total + 1) > self.config.num_device_blocks
        if too_big:
            with pytest.raises(InvalidArgumentError):
                self.core_resume(i, num_tool_tokens)
            r = s.request(i)
            assert r.state == RequestState.ABORTED
            assert not r.device_blocks and not r.host_blocks and r.num_computed_tokens == 0
            self.allowed_aborts.add(i)
        else:
            self.core_resume(i, num_tool_tokens)
            self.model[i]["tool"] += num_tool_tokens
            r = s.request(i)
            assert not r.tool_pending and r.state not in TERMINAL

    @precondition(lambda self: self.scheduler is not None)
    @rule(pick=_PICK, kind=st.sampled_from(["zero", "small", "small", "block", "huge"]))
    def resume(self, pick, kind):
        ids = self.ids_where(lambda r: r.tool_pending)
        if not ids:
            return
        i = ids[pick % len(ids)]
        bs = self.config.block_size
        num_tool_tokens = {
            "zero": 0,
            "small": 1 + pick % 4,
            "block": bs + pick % (2 * bs),
            "huge": pick % (self.config.num_device_blocks * bs + 1),
        }[kind]
        self.resume_one(i, num_tool_tokens)

    @precondition(lambda self: self.scheduler is not None)
    @rule(pick=_PICK)
    def abort(self, pick):
        ids = self.live_ids()
        if not ids or pick % 3:  # aborts end requests early: keep them to a third of draws
            return
        i = ids[pick % len(ids)]
        self.scheduler.abort(i)
        self.allowed_aborts.add(i)
        r = self.scheduler.request(i)
        assert r.state == RequestState.ABORTED and not r.device_blocks and not r.host_blocks

    @precondition(lambda self: self.scheduler is not None)
    @rule(pick=_PICK)
    def finish(self, pick):
        ids = self.ids_where(lambda r: self.just_sampled(r) and r.num_generated_tokens > 0)
        if not ids:
            return
        i = ids[pick % len(ids)]
        self.scheduler.finish(i)
        self.finished_by_test.add(i)
        r = self.scheduler.request(i)
        assert r.state == RequestState.FINISHED and not r.device_blocks and not r.host_blocks

    @precondition(lambda self: self.scheduler is not None)
    @rule(pick=_PICK)
    def remove(self, pick):
        ids = sorted(self.settled)
        if not ids:
            return
        i = ids[pick % len(ids)]
        self.scheduler.remove(i)
        assert not self.scheduler.contains(i)
        del self.model[i]
        self.settled.discard(i)
        self.removed.add(i)

    @precondition(lambda self: self.scheduler is not None)
    @rule(pick=_PICK, expected=st.sampled_from([-1.0, 0.0, 0.05, 10.0]))
    def set_expected_duration(self, pick, expected):
        ids = self.ids_where(lambda r: r.tool_pending)
        if ids:
            self.scheduler.set_expected_duration(ids[pick % len(ids)], expected)

    @precondition(lambda self: self.scheduler is not None)
    @rule(idle_s=st.sampled_from([0.001, 0.1, 1.0, 30.0]))
    def advance_clock(self, idle_s):
        self.now_s += idle_s

    @precondition(lambda self: self.scheduler is not None)
    @rule(
        num_steps=st.sampled_from([1, 2, 5, 10, 20]),
        duration_factor=st.sampled_from([0.0, 0.5, 1.0, 1.0, 3.0]),
        stall_fraction=st.sampled_from([0.0, 0.0, 0.25, 1.0]),
        tool_call_rate=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
        finish_sampled=st.booleans(),
        inflight=st.sampled_from([None, None, None, "abort", "resume"]),
        seed=_PICK,
    )
    def steps(self, num_steps, duration_factor, stall_fraction, tool_call_rate, finish_sampled, inflight, seed):
        """Runs steps; after each, some requests that just sampled call a tool, as an engine would."""
        rng = random.Random(seed)

        def during_step(plan):
            # Something arrives while the executor runs the plan: a client disconnect or a tool's
            # return.
            if inflight == "abort":
                ids = self.live_ids()
                if ids:
                    i = rng.choice(ids)
                    self.scheduler.abort(i)
                    self.allowed_aborts.add(i)
            elif inflight == "resume":
                ids = self.ids_where(lambda r: r.tool_pending)
                if ids:
                    self.resume_one(rng.choice(ids), rng.randrange(3))

        for k in range(num_steps):
            last = k == num_steps - 1
            _, out = self.step(duration_factor, stall_fraction, finish_sampled and not (last and inflight),
                               during_step if last and inflight else None)
            for i in out.sampled:
                if rng.random() < tool_call_rate and self.just_sampled(self.scheduler.request(i)):
                    self.scheduler.intercept(i, self.now_s, rng.choice([-1.0, -1.0, 0.0, 0.01, 0.5, 5.0, 100.0]),
                                             rng.choice(TOOL_NAMES))
                    self.num_intercepts += 1

    # ---- invariants ---------------------------------------------------------------------------

    @invariant()
    def core_invariants_hold(self):
        if self.scheduler is None:
            return
        s = self.scheduler
        s.check_invariants()
        self.check_blocks()
        num_live = 0
        for i, m in self.model.items():
            if i in self.settled:
                continue
            r = s.request(i)
            assert r.num_prompt_tokens == m["prompt"]
            assert r.num_generated_tokens == m["generated"], f"request {i}: generated {r.num_generated_tokens} != {m}"
            assert r.num_tool_tokens == m["tool"]
            assert r.num_tokens == m["prompt"] + m["generated"] + m["tool"]
            assert 0 <= r.num_computed_tokens <= r.num_tokens
            assert len(r.device_blocks) + len(r.host_blocks) == self.num_blocks(r.num_computed_tokens)
            if r.state == RequestState.ABORTED:
                assert i in self.allowed_aborts, f"request {i} was aborted with no reason reported"
            if r.state == RequestState.FINISHED:
                assert i in self.finished_by_test, f"request {i} finished without being told to"
            if r.state in TERMINAL:
                assert not r.device_blocks and not r.host_blocks
                self.settled.add(i)
            else:
                num_live += 1
        assert s.num_live_requests == num_live
        stats = s.stats()
        assert stats.num_running + stats.num_swapping_in <= self.config.max_running_requests

    # ---- the end of an example: drain --------------------------------------------------------

    def live_summary(self) -> str:
        """The live requests (state, computed, tokens) and the free device blocks, for failures."""
        s = self.scheduler
        live = {i: (s.request(i).state.label, s.request(i).num_computed_tokens, s.request(i).num_tokens)
                for i in self.live_ids()}
        return (f"live requests (state, computed, tokens): {live}, "
                f"free device blocks {s.num_free_device_blocks}/{self.config.num_device_blocks}")

    def drain_limit(self) -> int:
        """Steps within which some live request must end while draining.

        Nothing arrives during the drain, so progress means requests ending. The oldest live
        request can need a whole pool's worth of tokens in chunks of `max_batched_tokens`, plus a
        block per step both ways through the host pool; a bound on elapsed steps instead fails
        honest examples where one-token chunks prefill dozens of near-pool-size prompts.
        """
        cfg = self.config
        max_context = cfg.num_device_blocks * cfg.block_size
        per_request = -(-max_context // cfg.max_batched_tokens) + 2 * (cfg.num_device_blocks + cfg.num_host_blocks)
        return 2 * per_request + DRAIN_SLACK_STEPS

    def teardown(self):
        if self.scheduler is None:
            return
        STEP_TOTALS["examples"] += 1
        s = self.scheduler
        idle = 0
        limit = self.drain_limit()
        steps_since_an_end = 0
        num_live = len(self.live_ids())
        while True:
            for i in self.ids_where(lambda r: r.tool_pending):
                self.resume_one(i, 0)
            # Stop each request once it has generated a token past any intercept.
            for i in self.ids_where(lambda r: self.just_sampled(r) and r.num_generated_tokens > 0):
                s.finish(i)
                self.finished_by_test.add(i)
            live = self.live_ids()
            if not live:
                break
            steps_since_an_end = 0 if len(live) < num_live else steps_since_an_end + 1
            num_live = len(live)
            if steps_since_an_end > limit:
                raise AssertionError(f"no request ended in {limit} drain steps; {self.live_summary()}")
            plan, _ = self.step()
            if self.num_steps % 16 == 0:
                self.core_invariants_hold()
            idle = idle + 1 if plan.is_empty() else 0
            if idle >= MAX_IDLE_STEPS:
                raise AssertionError(
                    f"no progress for {idle} steps with nothing paused on a tool; {self.live_summary()}, "
                    f"free host blocks {s.num_free_host_blocks}/{self.config.num_host_blocks}"
                )
        assert s.num_live_requests == 0
        assert s.num_free_device_blocks == self.config.num_device_blocks
        assert s.num_free_host_blocks == self.config.num_host_blocks
        s.check_invariants()


class SharedPrefixMachine(SchedulerMachine):
    """The same, with token ids: prompts cut from two long shared sequences (some with a
    private tail, some under another salt), sampled and tool tokens from a tiny alphabet, so
    requests share cached blocks on both tiers all the time."""

    sharing = True
    SHARED = [[(j * 7 + k) % 50 + 1 for j in range(4096)] for k in range(2)]

    def core_add(self, num_prompt_tokens: int, limit: int, pick: int) -> int:
        tokens = list(self.SHARED[pick % 2][:num_prompt_tokens])
        if pick % 3 == 0:  # a private tail
            for j in range(max(0, num_prompt_tokens - 1 - pick % 5), num_prompt_tokens):
                tokens[j] = 100 + (pick * 13 + j) % 900
        salt = "tenant-b" if pick % 7 == 0 else ""
        i = self.scheduler.add_request(tokens, self.now_s, limit, salt)
        self.prompts[i] = tokens
        return i

    def core_resume(self, i: int, num_tool_tokens: int) -> None:
        self.scheduler.resume(i, [1 + j % 3 for j in range(num_tool_tokens)], self.now_s)

    def sample(self, sampling: list[int]) -> list[int]:
        # A function of the context length: requests on one prefix continue alike and share.
        return [1 + self.scheduler.request(i).num_tokens % 3 for i in sampling]

    def __init__(self) -> None:
        super().__init__()
        self.prompts: dict[int, list[int]] = {}

    @invariant()
    def token_ids_match(self):
        if self.scheduler is None:
            return
        for i, prompt in self.prompts.items():
            if i in self.model and i not in self.settled:
                r = self.scheduler.request(i)
                assert list(r.token_ids[:len(prompt)]) == prompt
                assert len(r.token_ids) == r.num_tokens


def _machine_for(policy: Policy, base: type = SchedulerMachine):
    name = f"{base.__name__}{policy.label.title()}"
    machine = type(name, (base,), {"policy": policy})
    machine.TestCase.settings = settings(
        max_examples=MAX_EXAMPLES_PER_POLICY,
        stateful_step_count=STEP_COUNT,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    return machine


# One test case per policy and machine, e.g. TestVllmV1 and TestSharedPrefixContinuum. Under
# counts only (SchedulerMachine) the cache policies run without a cache; with token ids
# (SharedPrefixMachine) every policy but vllm-0.2 shares cached blocks on both tiers.
for _policy in POLICIES:
    _suffix = "".join(part.title() for part in _policy.label.replace(".", "").split("-"))
    globals()[f"Test{_suffix}"] = _machine_for(_policy).TestCase
    if _policy.uses_prefix_cache:
        globals()[f"TestSharedPrefix{_suffix}"] = _machine_for(_policy, SharedPrefixMachine).TestCase
