"""Learns how long each tool takes, to estimate an interception's duration (T_INT).

Why an exponentially weighted mean: the waste of preserving a context is linear in T_INT, so
the expected waste is the waste at the *mean* duration, not at a quantile; and tool latency
drifts (a remote API under load, a warming cache), which an exponential weighting follows
with O(1) state per tool where a plain running mean would keep averaging stale history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _ToolStats:
    mean_s: float
    num_observations: int


class DurationEstimator:
    """Per-tool exponentially weighted mean of observed call durations."""

    def __init__(self, smoothing: float = 0.2) -> None:
        """Creates an estimator with no observations.

        Args:
            smoothing: Weight of the newest observation, in (0, 1]; 1 keeps only the latest.

        Raises:
            ValueError: smoothing is outside (0, 1].
        """
        if not (0.0 < smoothing <= 1.0):
            raise ValueError(f"smoothing={smoothing} is outside (0, 1]")
        self._smoothing = smoothing
        self._stats: dict[str, _ToolStats] = {}

    def observe(self, tool_name: str, duration_s: float) -> None:
        """Records one finished call of ``tool_name`` that took ``duration_s`` seconds.

        Raises:
            ValueError: duration_s is negative or not finite.
        """
        if not math.isfinite(duration_s) or duration_s < 0:
            raise ValueError(f"duration_s={duration_s} is outside [0, inf)")
        stats = self._stats.get(tool_name)
        if stats is None:
            # The first observation is the estimate; weighting it against a made-up prior
            # would bias the early estimates toward that prior.
            self._stats[tool_name] = _ToolStats(duration_s, 1)
            return
        stats.mean_s += self._smoothing * (duration_s - stats.mean_s)
        stats.num_observations += 1

    def estimate(self, tool_name: str, hint_s: float | None = None) -> float | None:
        """Returns the expected duration of a call, in seconds.

        Args:
            tool_name: The tool being called.
            hint_s: The caller's own estimate, which wins when given.

        Returns:
            The hint, else the learned mean, else None (the scheduler then falls back to the
            paper's elapsed-time estimate).
        """
        if hint_s is not None:
            return hint_s
        stats = self._stats.get(tool_name)
        return None if stats is None else stats.mean_s

    def num_observations(self, tool_name: str) -> int:
        """Number of calls of ``tool_name`` observed so far."""
        stats = self._stats.get(tool_name)
        return 0 if stats is None else stats.num_observations
