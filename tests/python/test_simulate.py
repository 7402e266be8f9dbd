"""The engine loop over the simulated executor: every request ends, memory comes back, the
policies differ the way the waste model says, and the CLI writes what it promises."""

from __future__ import annotations

import json

import pytest

from infercept import (
    CostModel,
    Policy,
    ReplayEngine,
    SimulatedExecutor,
    StepResult,
    simulated_config,
)
from infercept.bench.runner import BenchSetup, run_one
from infercept.bench.workload import Segment, WorkloadRequest, load_trace, poisson_arrivals, scale_to_context
from infercept.cli import main
from infercept.policy_names import POLICY_NAMES

POLICIES = ["vllm-0.2", "discard", "preserve", "swap", "infercept"]  # the paper's five


def _small_cost() -> CostModel:
    cost = CostModel.builtin("gptj-6b-a100")
    cost.kv_capacity_tokens = 6000  # a small pool: preemption and swaps happen
    cost.saturation_tokens = 256
    return cost


def _requests(num: int) -> list[WorkloadRequest]:
    requests = []
    for i in range(num):
        segments = (Segment(20 + i % 7, 0.05 * (i % 5), 5 + i % 3),
                    Segment(10 + i % 4, 30.0 if i % 3 == 0 else 1e-4, 8),
                    Segment(15))
        requests.append(WorkloadRequest(f"r{i}", "synthetic", 200 + 37 * (i % 11), segments, arrival_s=0.2 * i))
    return requests


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_request_finishes_and_memory_returns(policy: str) -> None:
    cost = _small_cost()
    config = simulated_config(cost, policy, host_to_device_ratio=1.0)
    engine = ReplayEngine(config, cost, SimulatedExecutor(cost, config.block_size), check_invariants=True)
    requests = _requests(40)
    result = engine.run(requests, duration_s=10.0)

    assert not result.aborted
    assert all(r.finish_s is not None for r in result.records)
    by_id = {r.request_id: r for r in result.records}
    for request in requests:
        # Each request decoded exactly its script's tokens, pauses and all.
        assert by_id[request.request_id].num_output_tokens == request.num_output_tokens
    core = engine.scheduler
    assert core.num_free_device_blocks == config.num_device_blocks
    assert core.num_free_host_blocks == config.num_host_blocks
    assert result.waste["total_byte_s"] <= result.waste["capacity_byte_s"]


def test_policies_leave_their_own_waste_signature() -> None:
    cost = _small_cost()
    fractions = {}
    for policy in POLICIES:
        config = simulated_config(cost, policy, host_to_device_ratio=1.0)
        engine = ReplayEngine(config, cost, SimulatedExecutor(cost, config.block_size))
        result = engine.run(_requests(40), duration_s=10.0)
        fractions[policy] = result.waste
    # Discarding policies never hold paused contexts; preserve never recomputes a pause
    # (preemption may still recompute); only swap-capable policies stall on copies.
    assert fractions["vllm-0.2"]["preserved_idle_byte_s"] == 0
    assert fractions["discard"]["preserved_idle_byte_s"] == 0
    assert fractions["vllm-0.2"]["recompute_byte_s"] > 0
    assert fractions["preserve"]["preserved_idle_byte_s"] > 0
    assert fractions["discard"]["swap_stall_byte_s"] == 0
    assert fractions["infercept"]["total_byte_s"] < fractions["preserve"]["total_byte_s"]
    assert fractions["infercept"]["total_byte_s"] < fractions["vllm-0.2"]["total_byte_s"]


def test_trace_replay_infercept_wastes_least(trace_file) -> None:
    """The paper's claim, under the paper's rule: min-waste wastes the least device
    memory-time. (The default, demand-aware rule keeps contexts nobody needs, which the ledger
    still counts as idle, to resume them sooner: see the test below.)"""
    templates = load_trace(trace_file)
    setup = BenchSetup.from_profile(CostModel.builtin("gptj-6b-a100"), 240.0, seed=3,
                                    demand_aware_preserve=False)
    rows = {policy: run_one(templates, policy, 3.0, setup) for policy in POLICIES}
    for policy in POLICIES:
        assert rows[policy]["num_aborted"] == 0
        assert rows[policy]["num_finished"] == rows[policy]["num_requests"]
    for policy in ["vllm-0.2", "discard", "preserve", "swap"]:
        assert rows["infercept"]["waste_fraction"] < rows[policy]["waste_fraction"], policy


def test_demand_aware_min_waste_is_as_fast_as_the_best_fixed_policy(trace_file) -> None:
    """With memory to spare min-waste keeps paused contexts (as preserve does) instead of
    swapping them out only to wait for their swap-in: its latency is no worse than the best
    fixed policy's, and better than under the paper's rule."""
    templates = load_trace(trace_file)
    cost = CostModel.builtin("gptj-6b-a100")
    rows = {policy: run_one(templates, policy, 3.0, BenchSetup.from_profile(cost, 240.0, seed=3))
            for policy in POLICIES}
    paper = run_one(templates, "infercept", 3.0,
                    BenchSetup.from_profile(cost, 240.0, seed=3, demand_aware_preserve=False))
    best_fixed = min(rows[p]["normalized_latency"] for p in POLICIES if p != "infercept")
    assert rows["infercept"]["normalized_latency"] <= best_fixed * 1.01
    assert rows["infercept"]["normalized_latency"] < paper["normalized_latency"]


def test_simulated_step_time_follows_the_profile() -> None:
    cost = CostModel.builtin("gptj-6b-a100")
    config = simulated_config(cost, Policy.PRESERVE)
    engine = ReplayEngine(config, cost, SimulatedExecutor(cost, config.block_size))
    core = engine.scheduler
    core.add_request(100, 0.0)
    plan = core.schedule(0.0)
    result = SimulatedExecutor(cost, config.block_size).execute(plan)
    assert result.duration_s == pytest.approx(10e-3 + 0.0463e-3 * 100)
    assert result.swap_stall_s == 0
    core.update(plan, StepResult(result.duration_s), result.duration_s)


def test_cli_writes_rows_with_required_keys(trace_file, tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    code = main(["simulate", "--trace", str(trace_file), "--profile", "gptj-6b-a100", "--rates", "1,2",
                 "--policies", "vllm-0.2,infercept", "--duration", "60", "--json", str(out), "--rows-only"])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["rate"]) for r in rows] == [("vllm-0.2", 1), ("infercept", 1), ("vllm-0.2", 2), ("infercept", 2)]
    for row in rows:
        for key in ["policy", "rate", "normalized_latency", "throughput_rps", "p50_latency_s", "p99_latency_s",
                    "waste_fraction"]:
            assert key in row
    printed = capsys.readouterr().out
    assert "normalized_latency" in printed and "infercept" in printed


def test_cli_rejects_bad_arguments(trace_file, capsys) -> None:
    assert main(["simulate", "--trace", str(trace_file), "--profile", "no-such-profile", "--rates", "1"]) == 2
    assert "no-such-profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--trace", str(trace_file), "--policies", "vllm-0.2,bogus"])
    with pytest.raises(SystemExit):
        main(["simulate", "--trace", str(trace_file), "--rates", "1,-2"])


def test_scaled_trace_fits_a_small_context(trace_file) -> None:
    templates = scale_to_context(load_trace(trace_file), 2048)
    requests = poisson_arrivals(templates, 2.0, 30.0, seed=1)
    assert requests and all(r.max_context_tokens <= 2048 for r in requests)


@pytest.mark.parametrize("policy", ["swap", "infercept"])
def test_swapped_contexts_come_back_when_the_device_pool_is_full(policy):
    # Regression: a 64-block pool under the Table 1 mix filled up with preserved and resumable
    # contexts while the queue's head waited, swapped out, for more free blocks than existed;
    # nothing ran and the replay stalled. Swap-ins now take what is free and reclaim paused or
    # lower-priority contexts when nothing else can free memory.
    from infercept import CostModel, ReplayEngine, SimulatedExecutor, simulated_config
    from infercept.bench.generator import generate_workload
    from infercept.bench.workload import poisson_arrivals, scale_to_context

    cost = CostModel.builtin("gptj-6b-a100")
    cost.kv_capacity_tokens = 64 * 16
    arrivals = poisson_arrivals(scale_to_context(generate_workload(60, 0), 1024), 2.0, 30.0, 0)
    engine = ReplayEngine(simulated_config(cost, policy), cost, SimulatedExecutor(cost, 16),
                          check_invariants=True)
    result = engine.run(arrivals, 30.0)
    assert all(r.finish_s is not None for r in result.records)
    assert engine.scheduler.num_live_requests == 0


def test_vllm_is_a_deprecated_alias_of_vllm_0_2(trace_file, tmp_path) -> None:
    out = tmp_path / "rows.json"
    with pytest.warns(DeprecationWarning, match="'vllm' is deprecated.*'vllm-0.2'"):
        main(["simulate", "--trace", str(trace_file), "--profile", "gptj-6b-a100", "--rates", "1",
              "--policies", "vllm", "--duration", "20", "--json", str(out), "--rows-only"])
    assert [r["policy"] for r in json.loads(out.read_text())] == ["vllm-0.2"]


@pytest.mark.parametrize("policy", ["infercept", "vllm-v1", "continuum"])
def test_ranking_by_predicted_work_loses_nothing(policy: str) -> None:
    """LAMPS-style ranking re-keys queued, running and paused requests as their predictions
    come; every request still ends with its script's tokens and the pools come back whole."""
    cost = _small_cost()
    config = simulated_config(cost, policy, host_to_device_ratio=1.0)
    config.rank_s_per_predicted_token = 0.2
    engine = ReplayEngine(config, cost, SimulatedExecutor(cost, config.block_size, token_ids=True),
                          check_invariants=True, token_ids=True, prediction_error=0.5)
    requests = _requests(40)
    result = engine.run(requests, duration_s=10.0)

    assert not result.aborted
    by_id = {r.request_id: r for r in result.records}
    assert all(by_id[q.request_id].num_output_tokens == q.num_output_tokens for q in requests)
    assert engine.scheduler.num_free_device_blocks == config.num_device_blocks  # cached blocks count as free


def test_ranking_by_predicted_work_lowers_mean_normalized_latency_under_load() -> None:
    """A queue ranked by remaining output serves short programs first: under load (arrivals
    faster than the pool drains) the mean of latency per output token falls against FCFS."""
    cost = _small_cost()
    requests = []
    for i in range(60):  # long and short programs interleaved, all arriving within 3 s
        out = 200 if i % 2 == 0 else 10
        segments = (Segment(out, 0.5, 8), Segment(out))
        requests.append(WorkloadRequest(f"r{i}", "synthetic", 300, segments, arrival_s=0.05 * i))
    means = {}
    for rank in (0.0, 0.2):
        config = simulated_config(cost, "infercept", host_to_device_ratio=1.0)
        config.rank_s_per_predicted_token = rank
        engine = ReplayEngine(config, cost, SimulatedExecutor(cost, config.block_size))
        records = engine.run(requests, duration_s=3.0).records
        means[rank] = sum(r.latency_s / r.num_output_tokens for r in records) / len(records)
    assert means[0.2] < 0.8 * means[0.0], means


def test_the_learned_predictor_ranks_by_what_finished_programs_of_a_prompt_length_did() -> None:
    """learn_output_lengths, no oracle: long programs arrive with long prompts and short ones
    with short prompts, and once some have finished the core's own predictions (by prompt
    length bucket and turn) rank the queue: the mean normalized latency falls against FCFS,
    though by less than under the exact oracle, which knows from the first arrival."""
    cost = _small_cost()
    requests = []
    for i in range(120):
        long = i % 2 == 0
        out = 200 if long else 10
        segments = (Segment(out, 0.5, 8), Segment(out))
        requests.append(WorkloadRequest(f"r{i}", "synthetic", 300 if long else 40, segments,
                                        arrival_s=0.05 * i))
    means = {}
    for name, rank, learn in (("fcfs", 0.0, False), ("oracle", 0.2, False), ("learned", 0.2, True)):
        config = simulated_config(cost, "infercept", host_to_device_ratio=1.0)
        config.rank_s_per_predicted_token = rank
        config.learn_output_lengths = learn
        engine = ReplayEngine(config, cost, SimulatedExecutor(cost, config.block_size))
        records = engine.run(requests, duration_s=6.0).records
        means[name] = sum(r.latency_s / r.num_output_tokens for r in records) / len(records)
        if learn:
            assert engine.scheduler.num_learned_programs() == len(requests)
    assert means["oracle"] < means["learned"] < 0.8 * means["fcfs"], means


def _ranked_simulate(trace_file, out, *extra: str) -> dict:
    """One short ranked simulate run (infercept, 2 req/s, 20 s); its JSON."""
    assert main(["simulate", "--trace", str(trace_file), "--profile", "gptj-6b-a100", "--rates", "2",
                 "--duration", "20", "--policies", "infercept", "--rank-s-per-predicted-token", "0.2",
                 *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_cli_learned_predictor_is_recorded_and_needs_ranking(trace_file, tmp_path, capsys) -> None:
    payload = _ranked_simulate(trace_file, tmp_path / "learned.json", "--predictor", "learned")
    assert payload["rows"][0]["predictor"] == "learned"
    assert main(["simulate", "--trace", str(trace_file), "--predictor", "learned"]) == 2
    assert "predictor='learned' needs rank_s_per_predicted_token > 0" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(trace_file), "--predictor", "learned",
                 "--rank-s-per-predicted-token", "0.2", "--prediction-error", "0.5"]) == 2
    assert "prediction_error=0.5 is the oracle's error" in capsys.readouterr().err


def test_a_negative_prediction_error_is_rejected() -> None:
    cost = _small_cost()
    with pytest.raises(ValueError, match="prediction_error=-1"):
        ReplayEngine(simulated_config(cost, "infercept"), cost, SimulatedExecutor(cost, 16), prediction_error=-1)


def test_cli_ranks_by_predicted_work_and_rejects_a_negative_rate(trace_file, tmp_path, capsys) -> None:
    payload = _ranked_simulate(trace_file, tmp_path / "ranked.json", "--prediction-error", "0.5")
    from infercept.bench.command import cpu_description
    assert payload["cpu"] == cpu_description()  # the machine beside the figures, as elsewhere
    row = payload["rows"][0]
    assert row["rank_s_per_predicted_token"] == 0.2 and row["prediction_error"] == 0.5
    assert row["num_finished"] > 0
    with pytest.raises(SystemExit):
        main(["simulate", "--trace", str(trace_file), "--rank-s-per-predicted-token", "-1"])
    assert "-1 must be a finite number >= 0" in capsys.readouterr().err


def test_real_replay_predicts_each_program_once_as_the_simulator_would() -> None:
    """The real replay's arrival predictions: none without a predictor, the true output count
    at error 0, the simulator's stream of errors otherwise, a negative error rejected."""
    from infercept.bench.real_replay import _predictions
    from infercept.bench.replay import OutputPredictor
    requests = _requests(5)
    assert _predictions(requests, 0, None) == [None] * 5
    assert _predictions(requests, 0, 0.0) == [r.num_output_tokens for r in requests]
    twin = OutputPredictor(3, 0.5)
    assert _predictions(requests, 3, 0.5) == [twin.predict(r.num_output_tokens) for r in requests]
    assert _predictions(requests, 3, 0.5) != [r.num_output_tokens for r in requests]
    with pytest.raises(ValueError, match="prediction_error=-1"):
        _predictions(requests, 0, -1)
