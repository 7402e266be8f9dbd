"""``/metrics`` in the Prometheus text format: engine gauges, server counters, tokens/s."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServerCounters:
    """Counters the HTTP layer keeps (all monotonic).

    Attributes:
        requests: Completed HTTP requests by (endpoint, status code).
        paused_context_reused: Follow-ups that resumed a paused context (no prefill of it).
        paused_context_fallback: Follow-ups carrying a tool result that ran a normal prefill.
        paused_context_expired: Paused contexts dropped after their time-to-live (or evicted).
        paused_context_held: Responses that ended on a client tool call and kept their context.
        client_disconnects: Requests aborted because their client went away.
    """

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    paused_context_reused: int = 0
    paused_context_fallback: int = 0
    paused_context_expired: int = 0
    paused_context_held: int = 0
    client_disconnects: int = 0
    reused_prompt_tokens: int = 0


def _line(lines: list[str], name: str, kind: str, help_text: str,
          samples: list[tuple[dict[str, str], float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")


def render_metrics(stats: dict[str, Any], counters: ServerCounters, *,
                   num_device_blocks: int, num_host_blocks: int, block_bytes: int,
                   num_paused_contexts: int, generation_tokens_total: int,
                   prompt_tokens_total: int, generation_tokens_per_s: float) -> str:
    """The exposition text.

    Args:
        stats: ``LLMEngine.stats``.
        counters: The server's counters.
        num_device_blocks, num_host_blocks: Pool sizes (for usage fractions).
        block_bytes: Bytes of one KV block (to report swap traffic in bytes).
        num_paused_contexts: Paused contexts held for clients right now.
    """
    lines: list[str] = []
    gauge, counter = "gauge", "counter"
    _line(lines, "infercept_requests", gauge, "Engine requests by state.", [
        ({"state": "running"}, stats["num_running"]),
        ({"state": "waiting"}, stats["num_waiting"]),
        ({"state": "intercepted"}, stats["num_intercepted"]),
    ])
    _line(lines, "infercept_intercepted_requests", gauge,
          "Intercepted requests by what the policy did with their KV.", [
              ({"kv": "preserved"}, stats["num_preserved"]),
              ({"kv": "swapped"}, stats["num_swapped"]),
              ({"kv": "discarded"}, stats["num_discarded"]),
          ])
    used_device = num_device_blocks - stats["num_free_device_blocks"]
    used_host = num_host_blocks - stats["num_free_host_blocks"]
    _line(lines, "infercept_kv_blocks", gauge, "KV blocks per tier.", [
        ({"tier": "device", "state": "free"}, stats["num_free_device_blocks"]),
        ({"tier": "device", "state": "used"}, used_device),
        ({"tier": "host", "state": "free"}, stats["num_free_host_blocks"]),
        ({"tier": "host", "state": "used"}, used_host),
    ])
    _line(lines, "infercept_kv_usage_ratio", gauge, "Fraction of each tier's KV blocks in use.", [
        ({"tier": "device"}, used_device / num_device_blocks if num_device_blocks else 0.0),
        ({"tier": "host"}, used_host / num_host_blocks if num_host_blocks else 0.0),
    ])
    _line(lines, "infercept_swap_bytes_total", counter, "Bytes of KV swapped, by direction.", [
        ({"direction": "out"}, stats["num_swap_out_blocks"] * block_bytes),
        ({"direction": "in"}, stats["num_swap_in_blocks"] * block_bytes),
    ])
    _line(lines, "infercept_recomputed_tokens_total", counter,
          "Tokens recomputed for discarded contexts.", [({}, stats["num_recomputed_tokens"])])
    _line(lines, "infercept_preemptions_total", counter, "Requests preempted.",
          [({}, stats["num_preemptions"])])
    _line(lines, "infercept_waste_fraction", gauge,
          "GPU memory waste as a fraction of device KV memory-time, by cause.", [
              ({"cause": "total"}, stats["waste_fraction"]),
              ({"cause": "preserve"}, stats["preserve_waste_fraction"]),
              ({"cause": "recompute"}, stats["recompute_waste_fraction"]),
              ({"cause": "swap"}, stats["swap_waste_fraction"]),
          ])
    _line(lines, "infercept_engine_steps_total", counter, "Engine iterations.",
          [({}, stats["num_steps"])])
    _line(lines, "infercept_generation_tokens_total", counter, "Tokens sampled.",
          [({}, generation_tokens_total)])
    _line(lines, "infercept_prompt_tokens_total", counter, "Prompt tokens submitted.",
          [({}, prompt_tokens_total)])
    _line(lines, "infercept_generation_tokens_per_second", gauge,
          "Tokens sampled per second over the last 10 s.", [({}, generation_tokens_per_s)])
    _line(lines, "infercept_paused_contexts", gauge,
          "Paused contexts held for a client's tool round trip.", [({}, num_paused_contexts)])
    _line(lines, "infercept_paused_context_total", counter,
          "Client tool round trips: contexts held, reused by a follow-up, fallen back to a "
          "prefill, expired.", [
              ({"outcome": "held"}, counters.paused_context_held),
              ({"outcome": "reused"}, counters.paused_context_reused),
              ({"outcome": "fallback"}, counters.paused_context_fallback),
              ({"outcome": "expired"}, counters.paused_context_expired),
          ])
    _line(lines, "infercept_reused_prompt_tokens_total", counter,
          "Prompt tokens not prefilled because a paused context was resumed.",
          [({}, counters.reused_prompt_tokens)])
    _line(lines, "infercept_client_disconnects_total", counter,
          "Requests aborted because the client disconnected.", [({}, counters.client_disconnects)])
    _line(lines, "infercept_http_requests_total", counter, "HTTP requests by endpoint and status.",
          [({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(counters.requests.items())])
    return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of an exposition text by ``name{labels}`` (for tests and the load script)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples
