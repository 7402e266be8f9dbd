"""The benchmark harness without the model: generator, profiler fit, sim bench, calibration."""

from __future__ import annotations

import json
import math

import pytest

from infercept._core import CostModel
from infercept.bench.calibrate import (calibration_errors, relative_error, step_overhead_s,
                                       with_forward_scale, with_step_overhead)
from infercept.bench.generator import AUGMENTATION_TYPES, generate_workload
from infercept.cli import main
from infercept.engine.profiler import find_saturation_tokens, fit_forward


def test_generator_mix_follows_weights_and_table_1() -> None:
    requests = generate_workload(1200, seed=3)
    counts = {kind: sum(r.kind == kind for r in requests) for kind in AUGMENTATION_TYPES}
    assert set(counts) == {"math", "qa", "virtual_env", "chatbot", "image", "tts"}
    for kind, count in counts.items():
        assert 150 <= count <= 250, (kind, count)  # equal weights: 200 each
        rows = [r for r in requests if r.kind == kind]
        spec = AUGMENTATION_TYPES[kind]
        mean_intercepts = sum(r.num_intercepts for r in rows) / len(rows)
        assert mean_intercepts == pytest.approx(spec.num_intercepts[0], rel=0.25)
        durations = [s.tool_duration_s for r in rows for s in r.segments[:-1]]
        assert sum(durations) / len(durations) == pytest.approx(spec.intercept_s[0], rel=0.25)
    only_math = generate_workload(50, seed=1, mix={"math": 1.0})
    assert {r.kind for r in only_math} == {"math"}
    with pytest.raises(ValueError, match="unknown kinds"):
        generate_workload(5, seed=0, mix={"poetry": 1.0})


def test_generator_is_seed_deterministic() -> None:
    assert generate_workload(40, seed=7) == generate_workload(40, seed=7)
    assert generate_workload(40, seed=7) != generate_workload(40, seed=8)


def test_saturation_point_on_a_gpu_shaped_curve() -> None:
    # Flat at 10 ms up to 256 tokens, then 40 us per token: the knee is S.
    counts = [1, 16, 64, 128, 256, 512, 1024]
    samples = [(n, max(0.010, 0.010 + 40e-6 * (n - 256))) for n in counts]
    # At the knee the per-token time is 10 ms / 256 = 39 us: within 1/0.9 of the 40 us slope.
    assert find_saturation_tokens(samples) == 256


def test_saturation_point_on_an_affine_curve_amortizes_the_fixed_cost() -> None:
    # 5 ms fixed + 1 ms per token: per-token time within 1/0.9 of 1 ms from 45 tokens on.
    counts = [1, 8, 32, 64, 128, 256]
    assert find_saturation_tokens([(n, 0.005 + 0.001 * n) for n in counts]) == 64
    with pytest.raises(ValueError):
        find_saturation_tokens([(4, 0.1)])


def test_forward_fit_separates_the_attention_term() -> None:
    # T = 20 ms + 0.5 ms/token + 2 us/context token, over decode batches and prefill chunks.
    samples = [(float(b), float(b * c), 0.020 + 0.0005 * b + 2e-6 * b * c)
               for c in (32, 128, 384) for b in (1, 4, 16)]
    samples += [(float(n), float(n), 0.020 + 0.0005 * n + 2e-6 * n) for n in (8, 64, 256)]
    fit = fit_forward(samples)
    assert fit.attention_s_per_context_token == pytest.approx(2e-6, rel=1e-6)
    assert fit.affine.intercept_s == pytest.approx(0.020, rel=1e-6)
    assert fit.affine.slope_s_per_token == pytest.approx(0.0005, rel=1e-6)
    assert [n for n, _ in fit.points] == [1, 4, 8, 16, 64, 256]
    for n, seconds in fit.points:
        assert seconds == pytest.approx(0.020 + 0.0005 * n, rel=1e-6)


def test_forward_fit_follows_a_curved_forward_without_inflating_attention() -> None:
    # A CPU-like forward: steep over the first tokens, shallow after (f(1) = 45 ms, f(4) = 75,
    # f(16) = 100, f(64) = 140), plus 10 us per context token. A joint affine fit would push
    # the attention term up to absorb the curve; the points keep it where it is.
    f = {1: 0.045, 4: 0.075, 16: 0.100, 64: 0.140}
    samples = [(float(b), float(b * c), f[b] + 1e-5 * b * c) for c in (32, 128, 384) for b in (1, 4, 16)]
    samples += [(64.0, 64.0, f[64] + 1e-5 * 64)]
    samples += [(8.0, 8.0, 0.060 + 1e-5 * 8)]  # a noisy dip below f(4)
    fit = fit_forward(samples)
    assert fit.attention_s_per_context_token == pytest.approx(1e-5, rel=0.02)
    points = dict(fit.points)
    assert points[16] == pytest.approx(f[16], rel=0.01)
    assert points[64] == pytest.approx(f[64], rel=0.01)
    assert points[8] == pytest.approx(points[4]), "never less time for more tokens"
    cost = CostModel.builtin("gptj-6b-a100")
    cost.forward_points = fit.points
    assert cost.forward_time_s(40) == pytest.approx((points[16] + points[64]) / 2, rel=1e-9)
    with pytest.raises(ValueError, match="forward_points"):
        cost.forward_points = [(4.0, 0.1), (2.0, 0.2)]


def test_calibration_errors() -> None:
    real = [{"policy": "vllm-0.2", "rate": 1.0, "completed_rps": 2.0, "normalized_latency": 0.10},
            {"policy": "infercept", "rate": 1.0, "completed_rps": 4.0, "normalized_latency": 0.20,
             "busy_steps": [[8, 100, 0.05, 0.06], [8, 100, 0.05, 0.08]]}]
    sim = [{"policy": "vllm-0.2", "rate": 1.0, "completed_rps": 2.2, "normalized_latency": 0.09},
           {"policy": "infercept", "rate": 1.0, "completed_rps": 3.0, "normalized_latency": 0.25}]
    errors = calibration_errors(real, sim)
    assert errors["completed_rps"]["mean_abs"] == pytest.approx((0.1 + 0.25) / 2)
    assert errors["completed_rps"]["max_abs"] == pytest.approx(0.25)
    assert errors["normalized_latency"]["max_abs"] == pytest.approx(0.25)
    assert math.isnan(relative_error(1.0, 0.0))
    assert step_overhead_s(real) == pytest.approx(0.02)
    cost = with_step_overhead(CostModel.builtin("gptj-6b-a100"), 0.02)
    assert cost.forward.intercept_s == pytest.approx(CostModel.builtin("gptj-6b-a100").forward.intercept_s + 0.02)
    measured = CostModel.builtin("gptj-6b-a100")
    measured.forward_points = [(1.0, 0.045), (64.0, 0.14)]
    assert with_step_overhead(measured, 0.02).forward_time_s(64) == pytest.approx(0.16)
    with pytest.raises(ValueError, match="no simulated row"):
        calibration_errors(real, sim[:1])


def test_forward_scale_scales_every_part_of_t_fwd_and_not_the_copies() -> None:
    base = CostModel.builtin("gptj-6b-a100+attn")
    scaled = with_forward_scale(base, 1.25)
    assert scaled.step_time_s(100, 5000) == pytest.approx(1.25 * base.step_time_s(100, 5000))
    assert scaled.swap_time_s(1000) == pytest.approx(base.swap_time_s(1000))
    measured = CostModel.builtin("gptj-6b-a100")
    measured.forward_points = [(1.0, 0.045), (64.0, 0.14)]
    assert with_forward_scale(measured, 2.0).forward_time_s(64) == pytest.approx(0.28)
    assert "x 1.250" in scaled.source


def test_bench_sim_end_to_end_writes_json_and_plots(tmp_path, capsys) -> None:
    # vllm, discard and preserve: the core's swap path can stall a replay (reported, not here).
    code = main(["bench", "--generate", "30", "--executor", "sim", "--profile", "gptj-6b-a100",
                 "--rates", "0.5,1", "--duration", "20", "--context", "512", "--time-scale", "0.2",
                 "--num-device-blocks", "400", "--max-batched-tokens", "256",
                 "--policies", "vllm-0.2,discard,preserve", "--timeline-policy", "preserve",
                 "--out-dir", str(tmp_path), "--name", "t", "--no-progress", "--threshold", "1.0"])
    assert code == 0
    payload = json.loads((tmp_path / "t.json").read_text())
    assert {(r["policy"], r["rate"]) for r in payload["rows"]} == {
        (p, r) for p in ("vllm-0.2", "discard", "preserve") for r in (0.5, 1.0)}
    for row in payload["rows"]:
        assert row["num_finished"] == row["num_requests"] > 0
        assert row["normalized_latency"] > 0
        assert 0 <= row["waste_fraction"] <= 1
    assert payload["complete"] is True and payload["timeline"]["samples"]
    assert set(payload["comparison"]["sustained_rps"]) == {"vllm-0.2", "discard", "preserve"}
    for name in ("t_latency.png", "t_waste.png", "t_timeline.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "highest rate" in capsys.readouterr().out


def test_max_time_cuts_a_simulated_run_at_the_same_virtual_time() -> None:
    """--max-time applies to simulated runs too, so they compare with cut real runs."""
    from infercept.bench.runner import BenchSetup, run_one

    templates = generate_workload(30, seed=0)
    setup = BenchSetup(cost=CostModel.builtin("gptj-6b-a100"), duration_s=20, num_device_blocks=400,
                       max_batched_tokens=256)
    full = run_one(templates, "preserve", 1.0, setup)
    assert full["num_finished"] == full["num_requests"] > 0
    cut_s = full["end_s"] / 2
    cut = run_one(templates, "preserve", 1.0, BenchSetup(**{**setup.__dict__, "max_time_s": cut_s}))
    assert cut["end_s"] <= cut_s + 1.0  # the step that crosses the cut still completes
    assert cut["num_finished"] < full["num_finished"]


def _tiny_bench(tmp_path, *extra: str) -> list[str]:
    return ["bench", "--generate", "8", "--executor", "sim", "--profile", "gptj-6b-a100",
            "--rates", "0.5,1", "--duration", "5", "--context", "256", "--time-scale", "0.2",
            "--num-device-blocks", "200", "--max-batched-tokens", "256",
            "--policies", "vllm-0.2,preserve", "--out-dir", str(tmp_path), "--name", "t",
            "--no-progress", *extra]


def test_bench_keeps_finished_rows_when_a_later_row_raises(tmp_path, monkeypatch, capsys) -> None:
    # Long runs never lose their results: the JSON is rewritten after every (policy, rate).
    from infercept.bench import runner

    run_one = runner.run_one

    def failing_at_rate_1(templates, policy, rate, setup, timeline=None):
        if rate == 1.0 and policy == "preserve":
            raise RuntimeError("the machine went away")
        return run_one(templates, policy, rate, setup, timeline)

    monkeypatch.setattr(runner, "run_one", failing_at_rate_1)
    with pytest.raises(RuntimeError, match="went away"):
        main(_tiny_bench(tmp_path, "--no-plots"))
    payload = json.loads((tmp_path / "t.json").read_text())
    assert payload["complete"] is False
    assert [(r["policy"], r["rate"]) for r in payload["rows"]] == [
        ("vllm-0.2", 0.5), ("preserve", 0.5), ("vllm-0.2", 1.0)]
    assert all(r["num_finished"] == r["num_requests"] > 0 for r in payload["rows"])
    assert "holds the 3 rows that finished" in capsys.readouterr().err


def test_bench_without_matplotlib_fails_before_running_or_skips_plots(tmp_path, monkeypatch,
                                                                     capsys) -> None:
    import sys

    from infercept.bench import runner

    calls = []
    run_one = runner.run_one
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: calls.append(a[1]) or run_one(*a, **k))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises
    assert main(_tiny_bench(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "infercept[bench]" in err and "--no-plots" in err
    assert calls == [] and not (tmp_path / "t.json").exists()

    assert main(_tiny_bench(tmp_path, "--no-plots")) == 0
    payload = json.loads((tmp_path / "t.json").read_text())
    assert payload["complete"] is True and len(payload["rows"]) == 4
    assert "comparison" in payload
    assert not list(tmp_path.glob("*.png"))
    assert "plots skipped" in capsys.readouterr().err
