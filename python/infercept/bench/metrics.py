"""Per-request outcomes of a benchmark run and the figures the CLI reports (DESIGN section 7).

Latency excludes the time a request spends in intercepts: the tool's time is not the
engine's to save, so a request's latency is finish - arrival - tool time. A program's
completion time (an agent's whole run, what its user waits for) includes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one request in a run.

    Attributes:
        request_id: the request.
        arrival_s: arrival time, seconds from the start of the run.
        first_token_s: when its first output token was produced; None if none was.
        finish_s: when it finished; None if it did not finish within the run.
        num_output_tokens: tokens it decoded (so far, if unfinished); tool returns excluded.
        tool_time_s: time it spent in intercepts, excluded from latency.
        resumed_ttfts_s: per resumed turn, from the tool's return to the turn's first token.
    """

    request_id: str
    arrival_s: float
    first_token_s: float | None
    finish_s: float | None
    num_output_tokens: int
    tool_time_s: float = 0.0
    resumed_ttfts_s: tuple[float, ...] = ()

    @property
    def completion_s(self) -> float | None:
        """finish - arrival, tool time included; None if unfinished."""
        if self.finish_s is None:
            return None
        return self.finish_s - self.arrival_s

    @property
    def latency_s(self) -> float | None:
        """finish - arrival - tool time; None if unfinished."""
        if self.finish_s is None:
            return None
        return self.finish_s - self.arrival_s - self.tool_time_s


def summarize(records: Iterable[RequestRecord], duration_s: float) -> dict[str, float | int]:
    """Summarizes a run.

    Rates divide by duration_s: throughput_rps counts requests finished within the window
    (finish_s <= duration_s: a run drained long after its window says nothing about the rate it
    served), tokens_per_s counts num_output_tokens of every record (unfinished requests'
    tokens were produced too).
    normalized_latency is the mean over finished requests of latency / num_output_tokens
    (seconds per output token; requests with no output tokens are left out of it). Latency
    percentiles use numpy's default (linear) interpolation; mean_ttft_s is the mean of
    first_token_s - arrival_s over records that produced a token. mean/p95_completion_s are over
    finished records' completion_s (tool time included); mean/p95_resumed_ttft_s are over every
    resumed turn of every record (num_resumed_turns of them).

    With no records, or none finished, the counts and rates are 0 and every statistic over
    the empty set (normalized_latency, latencies, mean_ttft_s) is NaN.

    Args:
        records: one per request that arrived in the run.
        duration_s: the run's length in seconds, > 0.

    Returns:
        A dict with num_requests, num_finished, throughput_rps, tokens_per_s,
        normalized_latency, mean_latency_s, p50_latency_s, p90_latency_s, p99_latency_s,
        mean_ttft_s, mean_completion_s, p95_completion_s, num_resumed_turns,
        mean_resumed_ttft_s, p95_resumed_ttft_s.

    Raises:
        ValueError: duration_s is not positive.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s={duration_s} must be > 0")
    records = list(records)
    finished = [r for r in records if r.finish_s is not None]
    latencies_s = np.array([r.latency_s for r in finished], dtype=float)
    per_token_s = [r.latency_s / r.num_output_tokens for r in finished if r.num_output_tokens > 0]
    ttfts_s = [r.first_token_s - r.arrival_s for r in records if r.first_token_s is not None]
    p50, p90, p99 = np.percentile(latencies_s, [50, 90, 99]) if len(latencies_s) else (math.nan,) * 3
    completions_s = [r.completion_s for r in finished]
    resumed_ttfts_s = [t for r in records for t in r.resumed_ttfts_s]
    return {
        "num_requests": len(records),
        "num_finished": len(finished),
        "throughput_rps": sum(r.finish_s <= duration_s for r in finished) / duration_s,
        "tokens_per_s": sum(r.num_output_tokens for r in records) / duration_s,
        "normalized_latency": _mean(per_token_s),
        "mean_latency_s": _mean(latencies_s),
        "p50_latency_s": float(p50),
        "p90_latency_s": float(p90),
        "p99_latency_s": float(p99),
        "mean_ttft_s": _mean(ttfts_s),
        "mean_completion_s": _mean(completions_s),
        "p95_completion_s": _percentile(completions_s, 95),
        "num_resumed_turns": len(resumed_ttfts_s),
        "mean_resumed_ttft_s": _mean(resumed_ttfts_s),
        "p95_resumed_ttft_s": _percentile(resumed_ttfts_s, 95),
    }


def resource_metrics(stats: Mapping[str, float], waste: Mapping[str, float],
                     bytes_per_block: int) -> dict[str, float | int]:
    """What a run cost the machine, from the scheduler's counters and its waste ledger.

    Args:
        stats: ``num_recomputed_tokens``, ``num_swap_out_blocks``, ``num_swap_in_blocks`` and,
            when there, ``prefix_cache_queries`` / ``prefix_cache_hits`` (tokens).
        waste: the ledger's byte-seconds (``total_byte_s``, ``capacity_byte_s``).
        bytes_per_block: KV bytes of one block (bytes per token x block size).

    Returns:
        num_recomputed_tokens; wasted_device_byte_s (device memory-time wasted, every cause);
        host_bytes_moved (blocks copied either way between device and host, in bytes);
        prefix_cache_hit_rate (hit tokens / looked-up tokens; 0 with no lookups).
    """
    queries = stats.get("prefix_cache_queries", 0)
    moved_blocks = stats["num_swap_out_blocks"] + stats["num_swap_in_blocks"]
    return {
        "num_recomputed_tokens": int(stats["num_recomputed_tokens"]),
        "wasted_device_byte_s": float(waste["total_byte_s"]),
        "host_bytes_moved": int(moved_blocks) * int(bytes_per_block),
        "prefix_cache_hit_rate": stats.get("prefix_cache_hits", 0) / queries if queries else 0.0,
    }


def _mean(values: Sequence[float] | np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def highest_sustained_rate(rows: Iterable[Mapping[str, Any]], threshold: float) -> dict[str, float]:
    """The highest request rate each policy sustains under a normalized-latency threshold.

    Per policy, rates are walked upwards until the first one whose normalized_latency exceeds
    the threshold. The answer is found by linear interpolation of latency against rate
    between that rate and the one before it: the rate where the line crosses the threshold.
    A NaN latency (nothing finished) exceeds every threshold but gives no line to follow, so
    the rate before it is the answer. If no rate exceeds, the answer is the highest rate
    measured (a lower bound); if the lowest rate already exceeds, it is NaN (the sustainable
    rate lies below the measured range).

    Args:
        rows: dicts with "policy", "rate" and "normalized_latency".
        threshold: seconds per output token.

    Returns:
        policy -> rate, in order of first appearance.

    Raises:
        ValueError: a policy has the same rate twice.
    """
    points_by_policy: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        point = (float(row["rate"]), float(row["normalized_latency"]))
        points_by_policy.setdefault(row["policy"], []).append(point)
    result = {}
    for policy, points in points_by_policy.items():
        points.sort()
        rates = [rate for rate, _ in points]
        if len(set(rates)) != len(rates):
            raise ValueError(f"policy {policy!r} has a rate more than once: {rates}")
        result[policy] = _crossing_rate(points, threshold)
    return result


def _crossing_rate(points: list[tuple[float, float]], threshold: float) -> float:
    """points: (rate, normalized_latency) sorted by rate."""
    for index, (rate, latency) in enumerate(points):
        if latency <= threshold:  # False for NaN
            continue
        if index == 0:
            return math.nan
        rate_under, latency_under = points[index - 1]
        if math.isnan(latency):
            return rate_under
        return rate_under + (threshold - latency_under) * (rate - rate_under) / (latency - latency_under)
    return points[-1][0]


def format_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Formats rows as a fixed-width text table with a header line and a rule.

    Floats are shown with 4 significant digits and numbers are right-aligned; a missing key is
    an empty cell.

    Args:
        rows: dicts, one per table row.
        columns: keys to show, in order; also the header.

    Returns:
        The table, lines joined by newlines, without a trailing newline.
    """
    rows = list(rows)
    cells = [[_format_cell(row.get(column)) for column in columns] for row in rows]
    is_numeric = [
        all(isinstance(row.get(column), (int, float, type(None))) for row in rows) for column in columns
    ]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]

    def join(line: Sequence[str]) -> str:
        padded = (c.rjust(w) if numeric else c.ljust(w) for c, w, numeric in zip(line, widths, is_numeric))
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([join(columns), rule] + [join(line) for line in cells])


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
