"""``/metrics``: Prometheus metrics of the engine and the HTTP layer, on one registry per app.

Three sources feed one :class:`prometheus_client.CollectorRegistry` (per app, not the global
one, so several apps in a process do not clash):

- engine state, read from ``LLMEngine.stats`` at scrape time (:class:`EngineCollector`);
- counters the HTTP layer bumps (paused-context outcomes, disconnects, responses by status);
- latency histograms the engine loop observes as outputs arrive (``EngineCore``; from the
  engine process they arrive with its outputs).

Names follow vLLM's where vLLM has an equivalent, with the ``infercept_`` prefix
(``vllm:time_to_first_token_seconds`` is ``infercept_time_to_first_token_seconds``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# What became of a context paused on a client tool: held (the response ended on the call),
# reused (a follow-up resumed it), fallback (a tool-result follow-up was prefilled instead),
# expired (its time-to-live passed), evicted (dropped to stay within max_paused_contexts).
PAUSED_CONTEXT_OUTCOMES = ("held", "reused", "fallback", "expired", "evicted")
# InterceptRecord.kind -> the tool_time histogram's label.
TOOL_KINDS = {"tool": "server", "client": "client", "scripted": "scripted"}

# vLLM's buckets for the same histograms (vllm/v1/metrics/loggers.py).
_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                  7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                      60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOOL_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0, 600.0)


@dataclass(frozen=True)
class EngineSnapshot:
    """What one scrape reports about the engine (read between two steps, then frozen).

    Attributes:
        stats: ``LLMEngine.stats``; keys the engine does not have yet read as 0.
        num_paused_contexts: Paused contexts held for clients right now.
        generation_tokens_total: Tokens the model sampled since start.
        prompt_tokens_total: Prompt tokens submitted (on a resume, only the appended ones).
        generation_tokens_per_s: Sampled tokens per second over the last 10 s.
    """

    stats: Mapping[str, float]
    num_paused_contexts: int = 0
    generation_tokens_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_per_s: float = 0.0


def _gauge(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]
           ) -> GaugeMetricFamily:
    labels = list(samples[0][0]) if samples else []
    family = GaugeMetricFamily(name, help_text, labels=labels)
    for sample_labels, value in samples:
        family.add_metric(list(sample_labels.values()), value)
    return family


def _counter(name: str, help_text: str, samples: list[tuple[dict[str, str], float]]
             ) -> CounterMetricFamily:
    labels = list(samples[0][0]) if samples else []
    family = CounterMetricFamily(name, help_text, labels=labels)
    for sample_labels, value in samples:
        family.add_metric(list(sample_labels.values()), value)
    return family


class EngineCollector:
    """Engine gauges and counters, rebuilt from the latest :class:`EngineSnapshot` per scrape.

    Args:
        num_device_blocks, num_host_blocks: Pool sizes (for usage fractions).
        block_bytes: Bytes of one KV block (to report swap traffic in bytes).
    """

    def __init__(self, num_device_blocks: int, num_host_blocks: int, block_bytes: int) -> None:
        self.num_device_blocks = num_device_blocks
        self.num_host_blocks = num_host_blocks
        self.block_bytes = block_bytes
        self.snapshot = EngineSnapshot(stats={})

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot

        def stat(key: str) -> float:  # 0 for a key this engine build does not report yet
            return float(snap.stats.get(key, 0))

        free_device, free_host = stat("num_free_device_blocks"), stat("num_free_host_blocks")
        used_device = self.num_device_blocks - free_device if snap.stats else 0.0
        used_host = self.num_host_blocks - free_host if snap.stats else 0.0
        device_usage = used_device / self.num_device_blocks if self.num_device_blocks else 0.0
        host_usage = used_host / self.num_host_blocks if self.num_host_blocks else 0.0

        yield _gauge("infercept_requests", "Engine requests by state.", [
            ({"state": "running"}, stat("num_running")),
            ({"state": "waiting"}, stat("num_waiting")),
            ({"state": "intercepted"}, stat("num_intercepted"))])
        yield _gauge("infercept_num_requests_running", "Requests in the running batch.",
                     [({}, stat("num_running"))])
        yield _gauge("infercept_num_requests_waiting", "Requests waiting to be scheduled.",
                     [({}, stat("num_waiting"))])
        yield _gauge("infercept_intercepted_requests",
                     "Intercepted requests by what the policy did with their KV.", [
                         ({"kv": "preserved"}, stat("num_preserved")),
                         ({"kv": "swapped"}, stat("num_swapped")),
                         ({"kv": "discarded"}, stat("num_discarded"))])
        yield _gauge("infercept_kv_blocks", "KV blocks per tier.", [
            ({"tier": "device", "state": "free"}, free_device),
            ({"tier": "device", "state": "used"}, used_device),
            ({"tier": "host", "state": "free"}, free_host),
            ({"tier": "host", "state": "used"}, used_host)])
        yield _gauge("infercept_kv_usage_ratio", "Fraction of each tier's KV blocks in use.", [
            ({"tier": "device"}, device_usage), ({"tier": "host"}, host_usage)])
        yield _gauge("infercept_kv_cache_usage_perc",
                     "Fraction of device KV blocks in use (1 = full), as vLLM's.",
                     [({}, device_usage)])
        yield _counter("infercept_swap_bytes", "Bytes of KV swapped, by direction.", [
            ({"direction": "out"}, stat("num_swap_out_blocks") * self.block_bytes),
            ({"direction": "in"}, stat("num_swap_in_blocks") * self.block_bytes)])
        yield _counter("infercept_recomputed_tokens", "Tokens recomputed for discarded contexts.",
                       [({}, stat("num_recomputed_tokens"))])
        yield _counter("infercept_preemptions", "Requests preempted.",
                       [({}, stat("num_preemptions"))])
        yield _gauge("infercept_waste_fraction",
                     "GPU memory waste as a fraction of device KV memory-time, by cause.", [
                         ({"cause": "total"}, stat("waste_fraction")),
                         ({"cause": "preserve"}, stat("preserve_waste_fraction")),
                         ({"cause": "recompute"}, stat("recompute_waste_fraction")),
                         ({"cause": "swap"}, stat("swap_waste_fraction"))])
        yield _counter("infercept_engine_steps", "Engine iterations.", [({}, stat("num_steps"))])

        # The prefix cache (tokens looked up and found; blocks cached but unreferenced).
        yield _counter("infercept_prefix_cache_queries",
                       "Prompt tokens looked up in the prefix cache.",
                       [({}, stat("prefix_cache_queries"))])
        yield _counter("infercept_prefix_cache_hits",
                       "Prompt tokens whose KV the prefix cache held (either tier).",
                       [({}, stat("prefix_cache_hits"))])
        yield _counter("infercept_prefix_cache_host_hits",
                       "Prefix cache hits found on the host tier (swapped back in).",
                       [({}, stat("prefix_cache_host_hits"))])
        yield _gauge("infercept_prefix_cache_blocks",
                     "Blocks held only by the prefix cache (unreferenced, evictable), per tier.", [
                         ({"tier": "device"}, stat("num_cached_device_blocks")),
                         ({"tier": "host"}, stat("num_cached_host_blocks"))])
        yield _counter("infercept_prefix_cache_evicted_blocks",
                       "Cached blocks evicted to make room, per tier.", [
                           ({"tier": "device"}, stat("num_device_evictions")),
                           ({"tier": "host"}, stat("num_host_evictions"))])

        yield _counter("infercept_generation_tokens", "Tokens sampled.",
                       [({}, snap.generation_tokens_total)])
        yield _counter("infercept_prompt_tokens", "Prompt tokens submitted.",
                       [({}, snap.prompt_tokens_total)])
        yield _gauge("infercept_generation_tokens_per_second",
                     "Tokens sampled per second over the last 10 s.",
                     [({}, snap.generation_tokens_per_s)])
        yield _gauge("infercept_paused_contexts",
                     "Paused contexts held for a client's tool round trip.",
                     [({}, snap.num_paused_contexts)])


class ServerMetrics:
    """The app's registry: the engine collector, the HTTP layer's counters, the histograms.

    Histograms are timed by the engine loop (``EngineCore``) and observed on its thread
    (prometheus_client metrics are thread-safe) or, from the engine process, on the event loop
    as its outputs arrive. Each covers one engine segment: from ``add_request`` (or
    ``resume``) running in the engine to the final token or the client tool call, i.e. one
    HTTP response.

    Attributes:
        time_to_first_token: Segment start to its first sampled token.
        inter_token_latency: Between consecutive sampled tokens of a request; the gap across a
            server-side tool call is left out (it is in ``tool_time``).
        e2e_request_latency: Segment start to its end (finished or paused on a client tool);
            aborted and failed requests are not observed.
        request_queue_time: Segment start to the start of the step that produced its first
            token: an approximation of time queued that also holds the prefill steps of a
            prompt longer than one step's token budget.
        tool_time: How long each tool call paused its request, by kind (server, client).
    """

    def __init__(self, num_device_blocks: int = 0, num_host_blocks: int = 0,
                 block_bytes: int = 0) -> None:
        self.registry = registry = CollectorRegistry()
        self.engine = EngineCollector(num_device_blocks, num_host_blocks, block_bytes)
        registry.register(self.engine)
        self.http_requests = Counter("infercept_http_requests",
                                     "HTTP requests by endpoint and status.",
                                     ["endpoint", "status"], registry=registry)
        self.paused_context = Counter(
            "infercept_paused_context",
            "Client tool round trips: contexts held, reused by a follow-up, fallen back to a "
            "prefill, expired, evicted.", ["outcome"], registry=registry)
        for outcome in PAUSED_CONTEXT_OUTCOMES:
            self.paused_context.labels(outcome)  # present from the start, at 0
        self.reused_prompt_tokens = Counter(
            "infercept_reused_prompt_tokens",
            "Prompt tokens not prefilled because a paused context was resumed.",
            registry=registry)
        self.client_disconnects = Counter(
            "infercept_client_disconnects", "Requests aborted because the client disconnected.",
            registry=registry)
        self.time_to_first_token = Histogram(
            "infercept_time_to_first_token_seconds",
            "Time to the first sampled token of a request (or of a resumed tool round trip).",
            buckets=_TTFT_BUCKETS_S, registry=registry)
        self.inter_token_latency = Histogram(
            "infercept_inter_token_latency_seconds",
            "Time between consecutive sampled tokens (server tool calls excluded).",
            buckets=_ITL_BUCKETS_S, registry=registry)
        self.e2e_request_latency = Histogram(
            "infercept_e2e_request_latency_seconds",
            "Time from a request (or resume) reaching the engine to its last token or client "
            "tool call.", buckets=_REQUEST_BUCKETS_S, registry=registry)
        self.request_queue_time = Histogram(
            "infercept_request_queue_time_seconds",
            "Time from a request reaching the engine to the start of the step that sampled its "
            "first token (queueing plus any earlier prefill chunks).",
            buckets=_REQUEST_BUCKETS_S, registry=registry)
        self.tool_time = Histogram(
            "infercept_tool_time_seconds",
            "How long each tool call paused its request, by kind: server (run by the engine) "
            "or client (from the response to the follow-up that resumed it).", ["kind"],
            buckets=_TOOL_BUCKETS_S, registry=registry)

    def count_paused_context(self, outcome: str, num: int = 1) -> None:
        """Counts ``num`` paused contexts that had ``outcome`` (one of PAUSED_CONTEXT_OUTCOMES)."""
        if num:
            self.paused_context.labels(outcome).inc(num)

    def render(self, snapshot: EngineSnapshot) -> bytes:
        """The exposition text, with the engine part taken from ``snapshot``."""
        self.engine.snapshot = snapshot
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of an exposition text by ``name{labels}``, labels sorted by name as
    prometheus_client writes them: ``infercept_kv_blocks{state="used",tier="device"}``."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples

