"""EngineLoop and the server's metrics against fake engines: no model, no HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import types

import pytest

pytest.importorskip("prometheus_client")

from infercept.engine.outputs import InterceptRecord, RequestOutput  # noqa: E402
from infercept.sampling import SamplingParams  # noqa: E402
from infercept.server import engine_loop as engine_loop_module  # noqa: E402
from infercept.server.engine_loop import EngineLoop, Update  # noqa: E402
from infercept.server.metrics import EngineSnapshot, ServerMetrics, parse_metrics  # noqa: E402


class _FakeEngine:
    """Just enough of LLMEngine for EngineLoop.add: records what add_request was given."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def has_unfinished(self) -> bool:
        return False

    def shutdown(self) -> None:
        pass


class _EngineWithoutSalt(_FakeEngine):
    def add_request(self, prompt=None, params=None, *, prompt_token_ids=None, use_tools=True,
                    client_tools=()):
        self.calls.append({"prompt_token_ids": prompt_token_ids})
        return len(self.calls)


class _EngineWithSalt(_FakeEngine):
    def add_request(self, prompt=None, params=None, *, prompt_token_ids=None, use_tools=True,
                    client_tools=(), cache_salt=None):
        self.calls.append({"prompt_token_ids": prompt_token_ids, "cache_salt": cache_salt})
        return len(self.calls)


@pytest.mark.parametrize("engine_type", [_EngineWithSalt, _EngineWithoutSalt])
def test_engine_loop_passes_cache_salt_to_engines_that_take_it(engine_type):
    engine = engine_type()
    loop = EngineLoop(engine)
    loop.start()
    try:
        async def add() -> None:
            await loop.add([1, 2], SamplingParams(max_tokens=1), cache_salt="t")
            await loop.add([3], SamplingParams(max_tokens=1))

        asyncio.run(add())
    finally:
        loop.stop()
    if engine_type is _EngineWithSalt:
        assert [c["cache_salt"] for c in engine.calls] == ["t", None]
    else:
        assert [c["prompt_token_ids"] for c in engine.calls] == [[1, 2], [3]]


class _ScriptedEngine:
    """Replays one request's outputs, one per step, moving a fake clock by each step's time.

    Args:
        clock: The namespace whose ``monotonic`` EngineLoop reads (patched in).
        script: (seconds the step takes, the output it returns) per step.
    """

    def __init__(self, clock: types.SimpleNamespace,
                 script: list[tuple[float, RequestOutput]]) -> None:
        self.clock, self.script = clock, list(script)
        self.has_request = False

    def add_request(self, prompt=None, params=None, *, prompt_token_ids=None, use_tools=True,
                    client_tools=()):
        self.has_request = True
        return 1

    def has_unfinished(self) -> bool:
        return self.has_request and bool(self.script)

    def step(self) -> list[RequestOutput]:
        duration_s, output = self.script.pop(0)
        self.clock.now += duration_s
        return [output]

    def release(self, request_id: int) -> None:
        pass

    def shutdown(self) -> None:
        pass


def test_latency_histograms_leave_the_server_tool_gap_out_of_inter_token_latency(monkeypatch):
    clock = types.SimpleNamespace(now=100.0)
    clock.monotonic = lambda: clock.now
    monkeypatch.setattr(engine_loop_module, "time", clock)
    start = RequestOutput(request_id=1, prompt=None, prompt_token_ids=[1, 2])
    call = InterceptRecord("tool", after_tokens=2, name="calculator")
    step = lambda **changes: dataclasses.replace(start, **changes)  # noqa: E731
    engine = _ScriptedEngine(clock, [
        (1.0, step(num_generated_tokens=1)),                        # TTFT 1 s, queued 0 s
        (1.0, step(num_generated_tokens=2, intercepts=[call])),     # ITL 1 s, then the tool
        (5.0, step(num_generated_tokens=2,
                   intercepts=[dataclasses.replace(call, duration_s=5.0)])),  # tool time 5 s
        (1.0, step(num_generated_tokens=3, intercepts=[call])),     # after the tool: no ITL
        (1.0, step(num_generated_tokens=4, finished=True, finish_reason="eos")),  # ITL 1 s
    ])
    metrics = ServerMetrics()
    loop = EngineLoop(engine, metrics)  # type: ignore[arg-type]
    loop.start()
    try:
        async def run() -> None:
            handle = await loop.add([1, 2], SamplingParams(max_tokens=4))
            while not (await asyncio.wait_for(handle.updates.get(), 10)).finished:
                pass

        asyncio.run(run())
    finally:
        loop.stop()
    m = parse_metrics(metrics.render(EngineSnapshot({})).decode())
    observed = {name: (m[f"infercept_{name}_count"], m[f"infercept_{name}_sum"])
                for name in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                             "request_queue_time_seconds", "e2e_request_latency_seconds")}
    assert observed == {"time_to_first_token_seconds": (1, 1.0),
                        "inter_token_latency_seconds": (2, 2.0),
                        "request_queue_time_seconds": (1, 0.0),
                        "e2e_request_latency_seconds": (1, 9.0)}
    assert (m['infercept_tool_time_seconds_count{kind="server"}'],
            m['infercept_tool_time_seconds_sum{kind="server"}']) == (1, 5.0)


def test_engine_collector_reads_prefix_cache_stats_and_zero_when_absent():
    stats = {"num_free_device_blocks": 6, "num_free_host_blocks": 20, "num_swap_out_blocks": 2,
             "prefix_cache_queries": 100, "prefix_cache_hits": 40, "prefix_cache_host_hits": 8,
             "num_cached_device_blocks": 3, "num_cached_host_blocks": 2,
             "num_device_evictions": 5, "num_host_evictions": 1}
    metrics = ServerMetrics(num_device_blocks=10, num_host_blocks=20, block_bytes=4)
    m = parse_metrics(metrics.render(EngineSnapshot(stats, generation_tokens_total=7)).decode())
    assert (m["infercept_prefix_cache_queries_total"], m["infercept_prefix_cache_hits_total"],
            m["infercept_prefix_cache_host_hits_total"]) == (100, 40, 8)
    assert (m['infercept_prefix_cache_blocks{tier="device"}'],
            m['infercept_prefix_cache_blocks{tier="host"}']) == (3, 2)
    assert (m['infercept_prefix_cache_evicted_blocks_total{tier="device"}'],
            m['infercept_prefix_cache_evicted_blocks_total{tier="host"}']) == (5, 1)
    assert m["infercept_kv_cache_usage_perc"] == pytest.approx(0.4)
    assert m['infercept_swap_bytes_total{direction="out"}'] == 8
    assert m["infercept_generation_tokens_total"] == 7

    # An engine without a prefix cache: the series are there, at 0. A second app's registry
    # does not clash with the first's.
    older = {k: v for k, v in stats.items() if not k.startswith(("prefix", "num_cached", "num_d",
                                                                  "num_h"))}
    m = parse_metrics(ServerMetrics(10, 20, 4).render(EngineSnapshot(older)).decode())
    assert m["infercept_prefix_cache_hits_total"] == 0
    assert m['infercept_prefix_cache_blocks{tier="device"}'] == 0


def test_update_carries_the_prefix_cache_hit_of_engines_that_report_it():
    output = RequestOutput(request_id=1, prompt=None, prompt_token_ids=[1, 2, 3])
    assert Update.of(output).num_cached_tokens == 0  # an engine without a prefix cache
    output.num_cached_tokens = 2  # type: ignore[attr-defined]  (RequestOutput's new field)
    assert Update.of(output).num_cached_tokens == 2
