"""One benchmark grid: every policy at every rate, on the real engine or the simulator.

Both executors see the same seeded Poisson arrivals of the same templates, the same pool
sizes and token budget, and report the same row (DESIGN.md §7): metrics from per-request
timestamps, the waste breakdown from the native ledger, and a memory timeline sampled after
every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from infercept._core import CostModel
from infercept.bench.executor import SimulatedExecutor
from infercept.bench.metrics import RequestRecord, resource_metrics, summarize
from infercept.bench.replay import ReplayEngine, simulated_config
from infercept.bench.workload import WorkloadRequest, poisson_arrivals

EXECUTORS = ("real", "sim")
# Who predicts output lengths for the ranked queue (BenchSetup.predictor).
PREDICTORS = ("oracle", "learned")


@dataclass
class BenchSetup:
    """What every run of a grid shares.

    Attributes:
        cost: The cost profile: times the simulator's steps and sizes the scheduler's swap
            budget and waste estimates (real and simulated alike).
        duration_s: The arrival window.
        num_device_blocks: Device KV pool, blocks.
        max_batched_tokens: Token budget per iteration.
        executor: 'real' (the engine on ``device``) or 'sim' (the simulated executor).
        seed: Seeds arrivals and prompts; every policy sees the same requests at a rate.
        block_size: Tokens per KV block.
        host_to_device_ratio: Host (swap) pool as a multiple of the device pool.
        max_running_requests: Requests in one batch at most.
        model: Real mode: the model (None: the embedded SmolLM2).
        device: Real mode: 'cpu', 'cuda', 'auto', ...
        dtype: Real mode: weights and KV dtype.
        max_time_s: Stop a run here even if requests are unfinished (they count as
            unfinished): bounds a run whose scheduler stalls in real mode, and cuts a simulated
            run at the same (virtual) time so the two stay comparable.
        token_ids: Sim mode: requests carry token ids, so the prefix cache works as on the real
            engine (False: the core's counts-only path, the cache idle).
        enable_prefix_caching: The core's prefix cache (policies that have one).
        demand_aware_preserve: min-waste's eq. 2 charges only memory someone wants (False:
            the paper's rule, every paused byte; simulator only).
        rank_s_per_predicted_token: LAMPS-style ranking of the queue by predicted remaining
            output (SchedulerConfig's field; 0: FCFS). The simulator predicts again at every
            tool return; the real engine once, at arrival.
        prediction_error: the oracle predictor's error, a log-normal sigma (ReplayEngine's).
        predictor: with ranking on, who predicts: 'oracle' (the script's true count, off by
            ``prediction_error``) or 'learned' (the core's OutputLengths, from the programs
            that have finished; SchedulerConfig.learn_output_lengths).
    """

    cost: CostModel
    duration_s: float
    num_device_blocks: int
    max_batched_tokens: int
    executor: str = "sim"
    seed: int = 0
    block_size: int = 16
    host_to_device_ratio: float = 2.0
    max_running_requests: int = 64
    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_time_s: float | None = None
    token_ids: bool = True
    enable_prefix_caching: bool = True
    demand_aware_preserve: bool = True
    rank_s_per_predicted_token: float = 0.0
    prediction_error: float = 0.0
    predictor: str = "oracle"
    _loaded: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor={self.executor!r} must be one of {EXECUTORS}")
        for name in ("duration_s", "num_device_blocks", "max_batched_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor={self.predictor!r} must be one of {PREDICTORS}")
        if self.predictor == "learned" and self.rank_s_per_predicted_token == 0:
            raise ValueError("predictor='learned' needs rank_s_per_predicted_token > 0 (at 0 "
                             "the queue is FCFS and nothing reads a prediction)")
        if self.predictor == "learned" and self.prediction_error != 0:
            raise ValueError(f"prediction_error={self.prediction_error} is the oracle's error; "
                             "the learned predictor has its own")

    @property
    def learned(self) -> bool:
        """The core predicts (OutputLengths) instead of the script's oracle."""
        return self.predictor == "learned" and self.rank_s_per_predicted_token > 0

    @classmethod
    def from_profile(cls, cost: CostModel, duration_s: float, **kwargs: Any) -> BenchSetup:
        """A simulated setup sized by the profile itself: its KV capacity and its S.

        This is the paper-scale comparison (``infercept simulate``): the pool is what the
        profiled GPU holds and the token budget is the profile's saturation point.

        Args:
            cost: The profile.
            duration_s: The arrival window.
            **kwargs: Any other field; ``max_running_requests`` defaults to 256 here.
        """
        kwargs.setdefault("max_running_requests", 256)
        block_size = kwargs.get("block_size", cls.block_size)
        return cls(cost=cost, duration_s=duration_s,
                   num_device_blocks=int(cost.kv_capacity_tokens // block_size),
                   max_batched_tokens=cost.saturation_tokens, **kwargs)

    @property
    def num_host_blocks(self) -> int:
        return int(self.num_device_blocks * self.host_to_device_ratio)

    @property
    def bytes_per_block(self) -> int:
        """KV bytes of one block, by the profile."""
        return int(self.cost.kv_bytes_per_token) * self.block_size

    def pool_cost(self) -> CostModel:
        """A copy of ``cost`` sized to this setup's pool and token budget."""
        cost = CostModel.from_json(self.cost.to_json())
        cost.kv_capacity_tokens = self.num_device_blocks * self.block_size
        cost.saturation_tokens = self.max_batched_tokens
        return cost


def _sample(t_s: float, stats: Any, num_device_blocks: int, num_host_blocks: int) -> dict:
    """One point of the memory timeline from ``Scheduler.stats()``."""
    return {"t_s": t_s,
            "device_used_blocks": num_device_blocks - stats.num_free_device_blocks,
            "host_used_blocks": num_host_blocks - stats.num_free_host_blocks,
            "num_running": stats.num_running, "num_waiting": stats.num_waiting,
            "num_preserved": stats.num_preserved, "num_swapped": stats.num_swapped,
            "num_discarded": stats.num_discarded}


def _row(policy: str, rate: float, setup: BenchSetup, records: list[RequestRecord],
         waste: dict[str, float], waste_fractions: dict[str, float], end_s: float,
         extra: dict) -> dict:
    row: dict[str, Any] = {"policy": policy, "rate": rate, "executor": setup.executor}
    if setup.rank_s_per_predicted_token > 0:  # the queue was ranked, not FCFS
        row.update(rank_s_per_predicted_token=setup.rank_s_per_predicted_token,
                   predictor=setup.predictor, prediction_error=setup.prediction_error)
    row.update(summarize(records, setup.duration_s))
    # Short windows: completions over the whole run (until drained) are the steadier rate.
    row["completed_rps"] = row["num_finished"] / end_s if end_s > 0 else 0.0
    row.update(waste_fractions)
    row.update({
        "waste": waste,
        "end_s": end_s,
    })
    row.update(extra)
    return row


def _stalled_row(policy: str, rate: float, setup: BenchSetup, error: str) -> dict:
    nan = float("nan")
    row: dict[str, Any] = {"policy": policy, "rate": rate, "executor": setup.executor,
                           "stalled": error}
    row.update(summarize([], setup.duration_s))
    row.update({key: nan for key in ("completed_rps", "waste_fraction", "preserve_waste_fraction",
                                     "recompute_waste_fraction", "swap_waste_fraction")})
    return row


def run_sim(requests: Sequence[WorkloadRequest], policy: str, rate: float, setup: BenchSetup,
            timeline: list[dict] | None = None) -> dict:
    """One policy at one rate on the simulated executor (virtual clock)."""
    cost = setup.pool_cost()
    config = simulated_config(cost, policy, setup.block_size, setup.host_to_device_ratio,
                              setup.max_running_requests)
    config.enable_prefix_caching = setup.enable_prefix_caching
    config.demand_aware_preserve = setup.demand_aware_preserve
    config.rank_s_per_predicted_token = setup.rank_s_per_predicted_token
    config.learn_output_lengths = setup.learned
    executor = SimulatedExecutor(cost, setup.block_size, token_ids=setup.token_ids, seed=setup.seed)
    engine = ReplayEngine(config, cost, executor, seed=setup.seed, prediction_error=setup.prediction_error)
    on_step = None
    if timeline is not None:
        def on_step(now_s: float) -> None:
            timeline.append(_sample(now_s, engine.scheduler.stats(), config.num_device_blocks,
                                    config.num_host_blocks))
    try:
        result = engine.run(requests, setup.duration_s, max_time_s=setup.max_time_s, on_step=on_step)
    except RuntimeError as error:  # the core's scheduler stalled: report it, keep the grid going
        return _stalled_row(policy, rate, setup, str(error))
    return _row(policy, rate, setup, result.records, result.waste, result.waste_fractions, result.end_s, {
        "num_steps": result.num_steps, "num_aborted": len(result.aborted),
        **_counters(result.stats, result.waste, setup)})


_COUNTERS = ("num_preemptions", "num_swap_out_blocks", "num_swap_in_blocks", "prefix_cache_queries",
             "prefix_cache_hits", "prefix_cache_host_hits", "num_device_evictions")


def _counters(stats: dict, waste: dict[str, float], setup: BenchSetup) -> dict[str, Any]:
    """The scheduler's counters a row reports, and what they cost (``resource_metrics``)."""
    row = {name: int(stats.get(name, 0)) for name in _COUNTERS}
    row.update(resource_metrics(stats, waste, setup.bytes_per_block))
    return row


def _load(setup: BenchSetup) -> tuple[Any, Any]:
    if setup._loaded is None:
        from infercept.engine.config import DTYPES
        from infercept.model import Tokenizer, load_model
        from infercept.model.loader import resolve_model_path
        path = resolve_model_path(setup.model)
        setup._loaded = (load_model(path, DTYPES[setup.dtype]), Tokenizer.from_path(path))
    return setup._loaded


def run_real(requests: Sequence[WorkloadRequest], policy: str, rate: float, setup: BenchSetup,
             timeline: list[dict] | None = None) -> dict:
    """One policy at one rate on the real engine, under the wall clock.

    Tools are the engine's scripted intercepts: real asynchronous waits of the trace's
    durations that return the trace's token counts. The row adds the step timing figures
    calibration needs: mean runner (forward + copies) and whole-step seconds of busy steps.
    """
    from infercept.engine import EngineConfig, LLMEngine
    from infercept.bench.real_replay import replay

    model, tokenizer = _load(setup)
    config = EngineConfig(model=setup.model, policy=policy, dtype=setup.dtype,
                          block_size=setup.block_size, num_device_blocks=setup.num_device_blocks,
                          num_host_blocks=setup.num_host_blocks,
                          max_batched_tokens=setup.max_batched_tokens,
                          max_running_requests=setup.max_running_requests, device=setup.device,
                          enable_prefix_caching=setup.enable_prefix_caching,
                          rank_s_per_predicted_token=setup.rank_s_per_predicted_token,
                          learn_output_lengths=setup.learned)
    cost = setup.pool_cost()
    # Per executed step: tokens, context, executor s (StepResult.duration_s), whole step s;
    # step - executor is the engine loop's own overhead, which T_fwd does not contain.
    busy: list[list[float]] = []
    with LLMEngine(config, model=model, tokenizer=tokenizer, cost_model=cost) as engine:
        last = {"t_s": 0.0, "step": None}

        def on_tick(t_s: float) -> None:
            step = engine.last_step
            if step is not None and step is not last["step"]:
                busy.append([float(step.num_batched_tokens), float(step.num_context_tokens),
                             step.duration_s, t_s - last["t_s"]])
            last["t_s"], last["step"] = t_s, step
            if timeline is not None:
                timeline.append(_sample(t_s, engine.scheduler.stats(), setup.num_device_blocks,
                                        setup.num_host_blocks))

        result = replay(engine, requests, setup.duration_s, seed=setup.seed, on_tick=on_tick,
                        max_time_s=setup.max_time_s,
                        prediction_error=(setup.prediction_error if setup.rank_s_per_predicted_token > 0
                                          and not setup.learned else None))
        stats = engine.stats
    num_busy = max(1, len(busy))
    return _row(policy, rate, setup, result.records, result.waste, result.waste_fractions, result.end_s, {
        "num_steps": int(stats["num_steps"]),
        "num_aborted": sum(r.finish_s is None for r in result.records),
        **_counters(stats, result.waste, setup),
        "mean_runner_s": sum(b[2] for b in busy) / num_busy,
        "mean_step_s": sum(b[3] for b in busy) / num_busy,
        "mean_predicted_step_s": sum(cost.step_time_s(b[0], b[1]) for b in busy) / num_busy,
        "busy_steps": busy,
    })


def run_one(templates: Sequence[WorkloadRequest], policy: str, rate: float, setup: BenchSetup,
            timeline: list[dict] | None = None) -> dict:
    """Seeded Poisson arrivals of ``templates`` at ``rate`` under ``policy``; returns the row."""
    requests = poisson_arrivals(templates, rate, setup.duration_s, setup.seed)
    run = run_real if setup.executor == "real" else run_sim
    return run(requests, policy, rate, setup, timeline)


def run_grid(templates: Sequence[WorkloadRequest], policies: Sequence[str], rates: Sequence[float],
             setup: BenchSetup, timeline_of: tuple[str, float] | None = None,
             timeline: list[dict] | None = None,
             on_row: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """Yields one row per (policy, rate), rates outermost, policies side by side.

    Args:
        timeline_of: (policy, rate) whose memory timeline is appended to ``timeline``.
    """
    for rate in rates:
        for policy in policies:
            sink = timeline if timeline_of == (policy, rate) else None
            row = run_one(templates, policy, rate, setup, sink)
            if on_row is not None:
                on_row(row)
            yield row
