"""Agent workloads (bench/agents.py), token ids in the simulator and the agent metrics.

The generator must be reproducible and stay within the shapes docs/workloads.md states; the
simulator with token ids must make the shared prefix hit the core's cache (and nothing else
change where the cache is off); the new metrics must add up on a hand-built run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from infercept._core import CostModel, Policy
from infercept.bench.agents import AGENT_SHAPES, generate_programs
from infercept.bench.executor import SimulatedExecutor
from infercept.bench.metrics import RequestRecord, resource_metrics, summarize
from infercept.bench.replay import ReplayEngine, simulated_config
from infercept.bench.token_ids import FIRST_ID, prompt_token_ids, sampled_token_id, tool_token_ids
from infercept.bench.workload import Segment, WorkloadRequest, poisson_arrivals, scale_to_context
from infercept.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]

# The policies of this core (new ones are picked up as the core grows them).
POLICIES = [policy.label for policy in Policy.all()]  # every row of the core's policy table


def _stats(programs: list[WorkloadRequest]) -> dict[str, np.ndarray]:
    return {
        "turns": np.array([len(p.segments) for p in programs]),
        "context": np.array([p.max_context_tokens for p in programs]),
        "outputs": np.array([s.completion_tokens for p in programs for s in p.segments]),
        "tool_s": np.array([s.tool_duration_s for p in programs for s in p.segments[:-1]]),
    }


def test_generator_is_seeded() -> None:
    assert generate_programs(40, 7, "agents") == generate_programs(40, 7, "agents")
    assert generate_programs(40, 7, "coding") != generate_programs(40, 8, "coding")


def test_coding_shape() -> None:
    programs = generate_programs(300, 0, "coding")
    s = _stats(programs)
    assert s["turns"].min() >= 10 and s["turns"].max() <= 20
    assert 3000 <= np.mean(s["context"]) and s["context"].max() <= 8192  # several thousand
    assert 10 <= np.mean(s["outputs"]) < 100  # tens of tokens per turn
    assert np.mean(s["tool_s"] < 1.0) >= 0.75  # mostly under 1 s ...
    assert np.percentile(s["tool_s"], 99) > 5.0  # ... with a long tail
    assert all(seg.tool in {t.name for t in AGENT_SHAPES["coding"].tools}
               for p in programs for seg in p.segments[:-1])
    # The context grows turn by turn by the tools' outputs (they dominate what is appended).
    assert sum(seg.tool_tokens for p in programs for seg in p.segments) > 3 * s["outputs"].sum()


def test_function_calling_and_chat_shapes() -> None:
    calls = _stats(generate_programs(300, 0, "function-calling"))
    assert calls["turns"].min() >= 4 and calls["turns"].max() <= 8
    assert 5.5 <= np.mean(calls["turns"]) <= 6.5  # about 6 turns
    assert calls["tool_s"].max() < 3.0  # short tools

    chat = _stats(generate_programs(300, 0, "chat"))
    assert chat["tool_s"].min() >= 3.0 and 15.0 <= np.mean(chat["tool_s"]) <= 60.0  # tens of seconds


def test_programs_of_an_app_share_one_prefix_and_scaling_keeps_it_shared() -> None:
    for limit in (None, 1024):
        programs = generate_programs(200, 1, "agents", num_apps=2, max_context_tokens=limit)
        by_app: dict[str, set[int]] = {}
        for p in programs:
            by_app.setdefault(p.app, set()).add(p.shared_prefix_tokens)
            assert p.app.startswith(p.kind) and p.prompt_tokens > p.shared_prefix_tokens
        assert len(by_app) == 6 and all(len(lengths) == 1 for lengths in by_app.values())
        lengths = [next(iter(v)) for v in by_app.values()]
        if limit is None:
            assert all(1024 <= n <= 2048 for n in lengths)  # system prompt + tool schemas
        else:
            assert max(p.max_context_tokens for p in programs) <= limit
            assert all(n < 1024 for n in lengths)
    # Counts scaled per request would un-share the prefix: the trace scaler refuses.
    with pytest.raises(ValueError, match="shared"):
        scale_to_context(generate_programs(5, 0, "coding"), 1024)


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown agent shapes"):
        generate_programs(5, 0, "poetry")
    with pytest.raises(ValueError, match="num_programs"):
        generate_programs(0, 0, "chat")
    with pytest.raises(ValueError, match="do not fit"):
        generate_programs(5, 0, "coding", max_context_tokens=16)


def test_token_ids_share_the_prefix_and_are_deterministic() -> None:
    a, b = generate_programs(2, 0, "coding", num_apps=1)
    assert a.app == b.app
    ids_a, ids_b = prompt_token_ids(a, seed=3), prompt_token_ids(b, seed=3)
    n = a.shared_prefix_tokens
    assert len(ids_a) == a.prompt_tokens and ids_a[:n] == ids_b[:n] and ids_a[n:] != ids_b[n:n + len(ids_a) - n]
    assert ids_a == prompt_token_ids(a, seed=3) and ids_a != prompt_token_ids(a, seed=4)
    assert min(ids_a) >= FIRST_ID
    assert len(tool_token_ids(a, 0, 3)) == a.segments[0].tool_tokens
    assert sampled_token_id(1, 5, 100) == sampled_token_id(1, 5, 100) != sampled_token_id(1, 5, 101)


def _small_cost() -> CostModel:
    cost = CostModel.builtin("gptj-6b-a100")
    cost.kv_capacity_tokens = 12000  # pressure: evictions, swaps and preemptions happen
    cost.saturation_tokens = 256
    return cost


def _replay(policy: str, requests, token_ids: bool, caching: bool = True, check: bool = False):
    cost = _small_cost()
    config = simulated_config(cost, policy, host_to_device_ratio=1.0)
    config.enable_prefix_caching = caching
    engine = ReplayEngine(config, cost, SimulatedExecutor(cost, config.block_size, token_ids=token_ids),
                          check_invariants=check)
    return engine, engine.run(requests, duration_s=20.0)


def _agent_requests(seed: int = 3) -> list[WorkloadRequest]:
    return poisson_arrivals(generate_programs(30, seed, "agents", max_context_tokens=2048), 1.0, 20.0, seed)


def test_the_shared_prefix_hits_the_cache_only_with_token_ids_and_caching() -> None:
    requests = _agent_requests()
    _, with_cache = _replay("discard", requests, token_ids=True)
    _, without_cache = _replay("discard", requests, token_ids=True, caching=False)
    _, counts_only = _replay("discard", requests, token_ids=False)
    assert with_cache.stats["prefix_cache_hits"] > 0
    assert without_cache.stats["prefix_cache_hits"] == counts_only.stats["prefix_cache_hits"] == 0
    # Discard with the cache gets its own context back: far less is recomputed.
    assert with_cache.stats["num_recomputed_tokens"] < counts_only.stats["num_recomputed_tokens"] / 4
    # Preserve never discards: its hits are new programs finding their app's prefix.
    _, preserve = _replay("preserve", requests, token_ids=True)
    assert preserve.stats["prefix_cache_hits"] > 0


@pytest.mark.parametrize("policy", ["vllm", "discard", "preserve", "swap", "infercept"])
def test_token_ids_change_nothing_where_the_cache_is_off(policy: str) -> None:
    """Without the cache no policy can read the ids: the runs must be identical."""
    requests = _agent_requests()
    runs = [_replay(policy, requests, token_ids=ids, caching=False)[1] for ids in (False, True)]
    counts, ids = ([(r.request_id, r.first_token_s, r.finish_s, r.num_output_tokens, r.resumed_ttfts_s)
                    for r in run.records] for run in runs)
    assert counts == ids
    assert runs[0].num_steps == runs[1].num_steps and runs[0].waste == runs[1].waste


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_keeps_the_invariants_with_token_ids(policy: str) -> None:
    requests = _agent_requests(seed=1)
    engine, result = _replay(policy, requests, token_ids=True, check=True)
    assert not result.aborted
    by_id = {r.request_id: r for r in result.records}
    for request in requests:
        record = by_id[request.request_id]
        assert record.finish_s is not None and record.num_output_tokens == request.num_output_tokens
        assert len(record.resumed_ttfts_s) == request.num_intercepts
    assert engine.scheduler.stats().num_running == 0


@pytest.mark.parametrize("policy", ["swap", "infercept"])
def test_swap_with_token_ids_does_not_stall(policy: str) -> None:
    """A swap-in whose blocks were all still cached on the device copies nothing: the plan is
    empty, and only its update() makes the request running again (the replay once skipped it)."""
    requests = poisson_arrivals(generate_programs(30, 1, "agents", max_context_tokens=2048), 1.0, 20.0, 0)
    _, result = _replay(policy, requests, token_ids=True)
    assert all(r.finish_s is not None for r in result.records)


def test_resumed_turn_ttft_and_completion_in_a_hand_built_replay() -> None:
    cost = CostModel.builtin("gptj-6b-a100")  # T_fwd(n) = 10 ms + 46.3 us * n, no attention term
    config = simulated_config(cost, "preserve")
    engine = ReplayEngine(config, cost, SimulatedExecutor(cost, config.block_size, token_ids=True))
    request = WorkloadRequest("p", "coding", 100, (Segment(5, 1.0, 10, "read_file"), Segment(3)),
                              app="a", shared_prefix_tokens=40)
    (record,) = engine.run([request], duration_s=1.0).records
    step_s = lambda n: 10e-3 + 0.0463e-3 * n  # noqa: E731
    # The tool returns 1 s after the 5th token; the next step computes that token and the
    # tool's 10 and samples the turn's first token.
    assert record.resumed_ttfts_s == pytest.approx((step_s(11),))
    assert record.completion_s == pytest.approx(step_s(100) + 4 * step_s(1) + 1.0 + step_s(11) + 2 * step_s(1))
    assert record.latency_s == pytest.approx(record.completion_s - 1.0)


def test_new_metrics_on_a_hand_built_run() -> None:
    records = [
        RequestRecord("a", 0.0, 0.5, 10.0, 20, tool_time_s=4.0, resumed_ttfts_s=(0.1, 0.3)),
        RequestRecord("b", 1.0, 1.2, 5.0, 10, tool_time_s=1.0, resumed_ttfts_s=(0.2,)),
        RequestRecord("c", 2.0, None, None, 0, resumed_ttfts_s=()),
    ]
    out = summarize(records, duration_s=10.0)
    assert out["mean_completion_s"] == pytest.approx((10.0 + 4.0) / 2)
    assert out["p95_completion_s"] == pytest.approx(4.0 + 0.95 * 6.0)
    assert out["num_resumed_turns"] == 3
    assert out["mean_resumed_ttft_s"] == pytest.approx(0.2)
    assert out["p95_resumed_ttft_s"] == pytest.approx(0.2 + 0.9 * 0.1)
    assert math.isnan(summarize([], 1.0)["p95_resumed_ttft_s"])

    stats = {"num_recomputed_tokens": 123, "num_swap_out_blocks": 7, "num_swap_in_blocks": 5,
             "prefix_cache_queries": 400, "prefix_cache_hits": 100}
    waste = {"total_byte_s": 2.5e9, "capacity_byte_s": 1e10}
    assert resource_metrics(stats, waste, bytes_per_block=16 * 1024) == {
        "num_recomputed_tokens": 123, "wasted_device_byte_s": 2.5e9,
        "host_bytes_moved": 12 * 16 * 1024, "prefix_cache_hit_rate": 0.25}


def test_bench_runs_an_agent_workload_and_writes_the_new_metrics(tmp_path, capsys) -> None:
    code = main(["bench", "--workload", "coding", "--generate", "20", "--executor", "sim",
                 "--profile", "gptj-6b-a100", "--rates", "0.5", "--duration", "10", "--context", "1024",
                 "--num-device-blocks", "200", "--max-batched-tokens", "256",
                 "--policies", "discard,preserve,infercept", "--out-dir", str(tmp_path), "--name", "a",
                 "--no-progress"])
    assert code == 0
    payload = json.loads((tmp_path / "a.json").read_text())
    assert "agent workload coding" in payload["workload"] and payload["setup"]["token_ids"] is True
    for row in payload["rows"]:
        assert row["num_finished"] == row["num_requests"] > 0
        for key in ("mean_completion_s", "p95_completion_s", "mean_resumed_ttft_s", "num_resumed_turns",
                    "num_recomputed_tokens", "wasted_device_byte_s", "host_bytes_moved",
                    "prefix_cache_hit_rate"):
            assert row[key] is not None, key
        assert row["prefix_cache_hit_rate"] > 0 and row["num_resumed_turns"] > 0
        assert row["host_bytes_moved"] == (row["num_swap_out_blocks"] + row["num_swap_in_blocks"]) * 16 * \
            payload["profile"]["kv_bytes_per_token"]
    assert "mean_completion_s" in capsys.readouterr().out
    assert (tmp_path / "a_programs.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_a_trace_for_an_agent_workload(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--workload", "chat", "--trace", "x.json", "--no-plots"])
    assert "--trace is the mixed workload's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--rates", "1"])
    assert "needs --trace FILE or --generate N" in capsys.readouterr().err


@pytest.mark.slow
def test_real_engine_replays_agent_programs_with_the_shared_prefix_cached() -> None:
    """The embedded SmolLM2 on the CPU: the second program of an app finds the app's prefix in
    the cache, and every resumed turn gets its TTFT."""
    import torch

    from infercept.bench.generator import scale_tool_time
    from infercept.bench.runner import BenchSetup, run_real

    programs = scale_tool_time(generate_programs(2, 0, "function-calling", num_apps=1,
                                                 max_context_tokens=256), 0.1)
    requests = [dataclasses.replace(p, arrival_s=0.5 * i) for i, p in enumerate(programs)]
    profile = REPO_ROOT / "benchmarks" / "results" / "profile_smollm2_cpu_1thread.json"
    setup = BenchSetup(cost=CostModel.load(str(profile)), duration_s=1.0, num_device_blocks=64,
                       max_batched_tokens=64, executor="real", max_time_s=300.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU
    try:
        row = run_real(requests, "preserve", 1.0, setup)
    finally:
        torch.set_num_threads(threads)
    assert row["num_finished"] == 2
    assert row["prefix_cache_hits"] >= 16 * (programs[0].shared_prefix_tokens // 16)
    assert row["num_resumed_turns"] == sum(p.num_intercepts for p in programs)
    assert 0 < row["mean_resumed_ttft_s"] < row["mean_completion_s"]


def test_infercept_keeps_block_conservation_under_pressure_on_coding() -> None:
    # Coding at 3.2 req/s on the paper's profile is past infercept's knee: swapped heads wait
    # for the swap-in budget with their device room reserved while new turns find cached
    # prefixes. A request once adopted a prefix whose first chunk did not fit beside that
    # reservation and sat in the queue holding its blocks (check_invariants: "holds KV it
    # should have freed", about 80 s of simulated time into this run).
    cost = CostModel.builtin("gptj-6b-a100")
    requests = poisson_arrivals(generate_programs(200, 0, "coding"), 3.2, 120.0, 0)
    config = simulated_config(cost, "infercept")
    executor = SimulatedExecutor(cost, config.block_size, token_ids=True, seed=0)
    engine = ReplayEngine(config, cost, executor, check_invariants=True, seed=0)
    result = engine.run(requests, 120.0)
    assert len(result.records) == len(requests)
    assert all(r.finish_s is not None for r in result.records)
