"""PNG plots of a benchmark (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

WASTE_PARTS = (("preserve_waste_fraction", "paused on device"),
               ("recompute_waste_fraction", "recompute"),
               ("swap_waste_fraction", "swap stall"))


def plot_latency(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "",
                 threshold: float | None = None) -> Path:
    """Normalized latency (s per output token) against request rate, one line per policy."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        points = sorted((r["rate"], r["normalized_latency"]) for r in rows if r["policy"] == policy)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="threshold")
    latencies = [r["normalized_latency"] for r in rows if r["normalized_latency"] > 0]
    if latencies and max(latencies) > 20 * min(latencies):
        # A collapsed baseline (seconds per token) would flatten every other line to zero.
        ax.set_yscale("log")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (s / output token)")
    ax.set_title(title or "normalized latency vs request rate")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_waste(rows: Sequence[Mapping[str, Any]], path: Path, rate: float | None = None) -> Path:
    """Stacked bars of the waste breakdown per policy (% of device memory-time) at one rate."""
    rate = max(r["rate"] for r in rows) if rate is None else rate
    chosen = [r for r in rows if r["rate"] == rate]
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(chosen)
    names = [r["policy"] for r in chosen]
    for key, label in WASTE_PARTS:
        values = [100 * r[key] for r in chosen]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("waste (% of device KV memory-time)")
    ax.set_title(f"waste breakdown at {rate:g} req/s")
    if sum(len(name) for name in names) > 40:  # long labels (e.g. "infercept vllm-v1") overlap
        ax.tick_params(axis="x", labelrotation=20)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_timeline(samples: Sequence[Mapping[str, Any]], path: Path, title: str,
                  num_device_blocks: int) -> Path:
    """Memory over one run: device and host KV blocks in use, requests per KV state."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    t = [s["t_s"] for s in samples]
    top.plot(t, [s["device_used_blocks"] for s in samples], label="device KV in use")
    top.plot(t, [s["host_used_blocks"] for s in samples], label="host KV (swapped)")
    top.axhline(num_device_blocks, color="grey", linestyle="--", linewidth=1, label="device pool")
    top.set_ylabel("KV blocks")
    top.legend(loc="upper right", fontsize="small")
    for key, label in (("num_running", "running"), ("num_preserved", "preserved"),
                       ("num_swapped", "swapped"), ("num_discarded", "discarded / recomputing"),
                       ("num_waiting", "waiting")):
        bottom.step(t, [s[key] for s in samples], where="post", label=label)
    bottom.set_xlabel("time (s)")
    bottom.set_ylabel("requests")
    bottom.legend(loc="upper right", fontsize="small")
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



def plot_programs(rows: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Agent metrics against rate, one line per policy: p95 program completion time (tool
    time included) and mean TTFT of resumed turns (tool return to the next turn's first token)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["rate"])
        rates = [r["rate"] for r in mine]
        left.plot(rates, [r["p95_completion_s"] for r in mine], marker="o", label=policy)
        right.plot(rates, [r["mean_resumed_ttft_s"] for r in mine], marker="o", label=policy)
    for ax, ylabel in ((left, "p95 program completion (s)"), (right, "mean resumed-turn TTFT (s)")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    left.legend()
    fig.suptitle(title or "agent programs vs request rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
