"""The policy comparison of the paper, on the simulated executor.

For every (policy, rate) pair: the same seeded Poisson arrivals of the trace's requests,
replayed through the native scheduler with a virtual clock advanced by the cost profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from infercept._core import CostModel
from infercept.executor import SimulatedExecutor
from infercept.metrics import summarize
from infercept.replay import ReplayEngine, simulated_config
from infercept.workload import WorkloadRequest, poisson_arrivals


@dataclass(frozen=True)
class SimulationSetup:
    """What every run of a comparison shares.

    Attributes:
        cost: the cost profile (sizes the device pool and the token budget, times steps).
        duration_s: the arrival window.
        seed: seeds the arrivals; every policy sees the same requests at a rate.
        block_size: tokens per KV block.
        host_to_device_ratio: host pool size as a multiple of the device pool.
        max_running_requests: cap on the batch's requests.
    """

    cost: CostModel
    duration_s: float
    seed: int = 0
    block_size: int = 16
    host_to_device_ratio: float = 2.0
    max_running_requests: int = 256


def simulate_one(templates: Sequence[WorkloadRequest], policy: str, rate_rps: float,
                 setup: SimulationSetup) -> dict:
    """Runs one policy at one rate and returns its row of figures.

    The row holds the metrics of ``infercept.metrics.summarize`` plus the waste breakdown as
    fractions of device memory-time (``waste_fraction`` and one per cause) and run facts.
    """
    requests = poisson_arrivals(templates, rate_rps, setup.duration_s, setup.seed)
    config = simulated_config(setup.cost, policy, setup.block_size, setup.host_to_device_ratio,
                              setup.max_running_requests)
    engine = ReplayEngine(config, setup.cost, SimulatedExecutor(setup.cost, setup.block_size))
    result = engine.run(requests, setup.duration_s)
    capacity = result.waste["capacity_byte_s"] or 1.0
    row = {"policy": policy, "rate": rate_rps}
    row.update(summarize(result.records, setup.duration_s))
    row.update({
        "waste_fraction": result.waste_fraction,
        "preserve_waste_fraction": result.waste["preserved_idle_byte_s"] / capacity,
        "recompute_waste_fraction": result.waste["recompute_byte_s"] / capacity,
        "swap_waste_fraction": result.waste["swap_stall_byte_s"] / capacity,
        "num_steps": result.num_steps,
        "end_s": result.end_s,
        "num_preemptions": result.stats["num_preemptions"],
        "num_recomputed_tokens": result.stats["num_recomputed_tokens"],
        "num_swap_out_blocks": result.stats["num_swap_out_blocks"],
        "num_aborted": len(result.aborted),
    })
    return row


def simulate_grid(templates: Sequence[WorkloadRequest], policies: Sequence[str], rates: Sequence[float],
                  setup: SimulationSetup,
                  on_row: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """Yields one row per (policy, rate), rates outermost so a table fills rate by rate."""
    for rate in rates:
        for policy in policies:
            row = simulate_one(templates, policy, rate, setup)
            if on_row is not None:
                on_row(row)
            yield row
