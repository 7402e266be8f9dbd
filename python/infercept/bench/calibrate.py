"""Simulator calibration: the same grid in real and simulated mode, and the relative errors.

The simulator's clock advances by the profile's T_fwd; the real engine's step also spends
time outside the forward (scheduling, sampling, building tensors, bookkeeping in Python).
``step_overhead_s`` measures that from a real run's busy steps, and ``with_step_overhead``
folds it into the forward's intercept, the per-step term where it belongs. On a shared machine
the forward itself can run slower during the run than when the profile was measured (other
jobs' use of memory bandwidth and cache); ``with_forward_scale`` scales T_fwd by the run's own
measured/predicted ratio (``forward_model_error``), so what is left of the simulator's error is
the scheduling, not the machine's speed on the day.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from infercept._core import CostModel

# Figures compared: completions per second over the drained run, and s per output token.
CALIBRATED_METRICS = ("completed_rps", "normalized_latency")


def relative_error(simulated: float, real: float) -> float:
    """(simulated - real) / real; NaN when either is NaN or real is 0."""
    if math.isnan(simulated) or math.isnan(real) or real == 0:
        return math.nan
    return (simulated - real) / real


def calibration_errors(real_rows: Sequence[Mapping[str, Any]], sim_rows: Sequence[Mapping[str, Any]],
                       metrics: Sequence[str] = CALIBRATED_METRICS) -> dict[str, Any]:
    """Relative error of the simulator per (policy, rate) and in summary.

    Rows are matched by (policy, rate). Returns ``{"rows": [...], metric: {"mean_abs",
    "max_abs"}}`` with each row holding policy, rate and ``{metric}_error``.

    Raises:
        ValueError: a real row has no simulated counterpart.
    """
    sim_by_key = {(r["policy"], float(r["rate"])): r for r in sim_rows}
    rows = []
    for real in real_rows:
        key = (real["policy"], float(real["rate"]))
        if key not in sim_by_key:
            raise ValueError(f"no simulated row for policy {key[0]!r} at rate {key[1]:g}")
        sim = sim_by_key[key]
        row = {"policy": key[0], "rate": key[1]}
        for metric in metrics:
            row[f"real_{metric}"] = float(real[metric])
            row[f"sim_{metric}"] = float(sim[metric])
            row[f"{metric}_error"] = relative_error(float(sim[metric]), float(real[metric]))
        rows.append(row)
    summary: dict[str, Any] = {"rows": rows}
    for metric in metrics:
        errors = [abs(r[f"{metric}_error"]) for r in rows if not math.isnan(r[f"{metric}_error"])]
        summary[metric] = {"mean_abs": sum(errors) / len(errors) if errors else math.nan,
                           "max_abs": max(errors) if errors else math.nan}
    return summary


def step_overhead_s(real_rows: Sequence[Mapping[str, Any]]) -> float:
    """Mean seconds a busy real step spends outside the runner (forward and copies)."""
    steps = [b for r in real_rows for b in r.get("busy_steps", [])]
    if not steps:
        return 0.0
    return max(0.0, sum(b[3] - b[2] for b in steps) / len(steps))


def forward_model_error(real_rows: Sequence[Mapping[str, Any]], cost: CostModel) -> float:
    """Mean relative error of the profile's T_fwd against the runner's measured step times."""
    steps = [b for r in real_rows for b in r.get("busy_steps", [])]
    predicted = sum(cost.step_time_s(b[0], b[1]) for b in steps)
    measured = sum(b[2] for b in steps)
    return relative_error(predicted, measured) if steps else math.nan


def with_step_overhead(cost: CostModel, overhead_s: float) -> CostModel:
    """A copy of ``cost`` whose T_fwd includes the engine loop's per-step time."""
    calibrated = CostModel.from_json(cost.to_json())
    calibrated.forward.intercept_s = cost.forward.intercept_s + overhead_s
    calibrated.forward_points = [(n, seconds + overhead_s) for n, seconds in cost.forward_points]
    calibrated.source = f"{cost.source}; + {1e3 * overhead_s:.2f} ms per-step engine overhead"
    return calibrated


def with_forward_scale(cost: CostModel, factor: float) -> CostModel:
    """A copy of ``cost`` whose T_fwd (intercept, slopes, points, attention term) is x ``factor``."""
    scaled = CostModel.from_json(cost.to_json())
    forward = scaled.forward
    forward.intercept_s = cost.forward.intercept_s * factor
    forward.slope_s_per_token = cost.forward.slope_s_per_token * factor
    scaled.forward = forward
    scaled.forward_points = [(n, seconds * factor) for n, seconds in cost.forward_points]
    scaled.attention_s_per_context_token = cost.attention_s_per_context_token * factor
    scaled.source = f"{cost.source}; T_fwd x {factor:.3f} (the run's measured step times)"
    return scaled
