"""`infercept simulate`, `bench` and `profile`: argument handling, output files, the report."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from infercept.bench.calibrate import (calibration_errors, forward_model_error, step_overhead_s,
                                       with_forward_scale, with_step_overhead)
from infercept.bench.agents import WORKLOADS, generate_programs
from infercept.bench.generator import generate_workload, scale_tool_time
from infercept.bench.metrics import format_table, highest_sustained_rate
from infercept.bench.runner import EXECUTORS, PREDICTORS, BenchSetup, run_grid
from infercept.policy_names import POLICY_NAMES

SIMULATE_COLUMNS = ["policy", "rate", "normalized_latency", "throughput_rps", "mean_latency_s",
                    "p50_latency_s", "p99_latency_s", "p95_completion_s", "mean_resumed_ttft_s",
                    "waste_fraction", "preserve_waste_fraction", "recompute_waste_fraction",
                    "swap_waste_fraction", "num_recomputed_tokens", "host_mb_moved",
                    "prefix_cache_hit_rate"]
TABLE_COLUMNS = ["policy", "rate", "normalized_latency", "completed_rps", "throughput_rps",
                 "tokens_per_s", "mean_ttft_s", "p50_latency_s", "p90_latency_s", "p99_latency_s",
                 "mean_completion_s", "p95_completion_s", "mean_resumed_ttft_s",
                 "p95_resumed_ttft_s", "waste_fraction", "preserve_waste_fraction",
                 "recompute_waste_fraction", "swap_waste_fraction", "num_recomputed_tokens",
                 "host_mb_moved", "prefix_cache_hit_rate", "num_finished", "num_requests"]
# Programs drawn for an agent workload when --generate does not say.
DEFAULT_PROGRAMS = 200
# infercept's waste is compared with every other policy's (the paper's four fixed ones first).
FIXED_POLICIES = tuple(p for p in POLICY_NAMES if p != "infercept")


def cpu_description() -> str:
    """The CPU as recorded beside every figure: its model name, x86 family/model, the vector
    instruction sets that decide which kernels run (AVX2, AVX-512, AMX), and the core count.
    The machine changes between sessions, so the figures must say which one they came from."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"
    flags = set(fields.get("flags", "").split())
    isa = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
                                   ("amx_tile", "AMX")) if flag in flags] or ["no AVX2"]
    family = (f" (family {fields['cpu family']} model {fields['model']})"
              if "cpu family" in fields and "model" in fields else "")
    return (f"{fields.get('model name', 'unknown CPU')}{family}, {', '.join(isa)}, "
            f"{os.cpu_count()} cores")


def machine_description() -> dict[str, str]:
    """The platform and the first lines of ``lscpu`` (where it exists)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    return {"platform": platform.platform(), "lscpu": "\n".join(lscpu.splitlines()[:10])}


def load_templates(args: argparse.Namespace) -> tuple[list, str]:
    """The workload's templates (scaled to ``--context`` and ``--time-scale``) and a description.

    ``--workload mixed`` is the paper's trace (``--trace``) or its six types (``--generate N``),
    scaled by ``scale_to_context``; an agent workload draws ``--generate`` programs (default
    DEFAULT_PROGRAMS) of ``--apps`` apps per shape, scaled by the generator so that programs of
    an app keep sharing their prefix.

    Raises:
        SystemExit: (argparse's error) a trace given for an agent workload, or neither a trace
            nor ``--generate`` for the mixed one.
    """
    from infercept.bench.workload import load_trace, scale_to_context
    workload = getattr(args, "workload", "mixed")
    if workload != "mixed":
        if args.trace is not None:
            args.parser.error(f"--trace is the mixed workload's; --workload {workload} is generated "
                              "(--generate N sets how many programs)")
        num = args.generate or DEFAULT_PROGRAMS
        templates = generate_programs(num, args.seed, workload, num_apps=args.apps,
                                      max_context_tokens=args.context)
        what = (f"agent workload {workload}: {num} programs, {args.apps} apps per shape, seed {args.seed}"
                + (f", scaled to <= {args.context} tokens" if args.context is not None else ""))
    else:
        if args.trace is not None:
            templates, what = load_trace(args.trace), f"trace {args.trace}"
        elif args.generate is not None:
            templates = generate_workload(args.generate, args.seed)
            what = f"generated: {args.generate} templates of the six Table 1 types, seed {args.seed}"
        else:
            args.parser.error("--workload mixed needs --trace FILE or --generate N")
        if args.context is not None:
            templates = scale_to_context(templates, args.context)
            what += f", contexts scaled to <= {args.context} tokens"
    if args.time_scale != 1.0:
        templates = scale_tool_time(templates, args.time_scale)
        what += f", tool durations x{args.time_scale:g}"
    return templates, what


def resolve_cost(args: argparse.Namespace):
    """The profile named by ``--profile``, else this machine's (cached, or measured now)."""
    from infercept.engine.profiles import load_profile
    if args.profile is not None:
        return load_profile(args.profile)
    from infercept.bench.profile import ProfileRequest, cached_or_measured
    cost, path, measured = cached_or_measured(ProfileRequest(args.model, args.dtype, args.device,
                                                             args.block_size))
    print(f"{'measured' if measured else 'cached'} profile {path}", file=sys.stderr)
    return cost


def sustained_ratios(rows: list[dict], threshold: float) -> dict[str, Any]:
    """Sustained rate per policy at ``threshold`` and infercept's ratios to the others."""
    sustained = highest_sustained_rate(rows, threshold)
    out: dict[str, Any] = {"threshold_s_per_token": threshold, "sustained_rps": sustained}
    if "infercept" in sustained:
        base = sustained["infercept"]
        out["infercept_over"] = {p: (base / r if r and not math.isnan(r) else math.nan)
                                 for p, r in sustained.items() if p != "infercept"}
    waste: dict[str, Any] = {}
    for rate in sorted({r["rate"] for r in rows}):
        at = {r["policy"]: r["waste_fraction"] for r in rows if r["rate"] == rate}
        if "infercept" not in at:
            continue
        ratios = {p: (at["infercept"] / w if w > 0 else math.nan) for p, w in at.items()
                  if p in FIXED_POLICIES}
        waste[f"{rate:g}"] = {"infercept_waste_over": ratios,
                              "infercept_lowest": all(at["infercept"] <= at[p] for p in ratios)}
    out["waste"] = waste
    return out


def _default_threshold(rows: list[dict]) -> float:
    """Twice the best normalized latency at the lowest rate: 'about unloaded' doubled."""
    lowest = min(r["rate"] for r in rows)
    values = [r["normalized_latency"] for r in rows if r["rate"] == lowest
              and not math.isnan(r["normalized_latency"])]
    return 2 * min(values) if values else math.nan


def _clean(value: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _shown(row: dict, columns: list[str] = TABLE_COLUMNS) -> dict:
    """The row with its waste fractions as percentages, for the table."""
    shown = dict(row)
    for key in columns:
        if key.endswith("waste_fraction"):
            shown[key] = f"{100 * row[key]:.2f}%"
    if "host_bytes_moved" in row:
        shown["host_mb_moved"] = row["host_bytes_moved"] / 2**20
    return shown


def _run(templates: list, args: argparse.Namespace, setup: BenchSetup, label: str,
         timeline: list[dict] | None,
         on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The grid with a progress bar; ``on_row`` gets the rows so far after each one finishes."""
    from tqdm import tqdm
    total = len(args.rates) * len(args.policies)
    rows: list[dict] = []
    with tqdm(total=total, desc=label, unit="run", disable=args.no_progress, file=sys.stderr) as bar:
        def finished(row: dict) -> None:
            rows.append(row)
            bar.set_postfix_str(f"{row['policy']} @ {row['rate']:g}: "
                                f"{row['normalized_latency']:.3g} s/tok")
            bar.update(1)
            if on_row is not None:
                on_row(rows)
        timeline_of = (args.timeline_policy, max(args.rates))
        for _ in run_grid(templates, args.policies, args.rates, setup, timeline_of, timeline,
                          finished):
            pass
    return rows


def missing_plot_dependency() -> str | None:
    """Why plots cannot be drawn here (the bench extra is missing), or None if they can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return (f"plots need matplotlib, from the bench extra: pip install 'infercept[bench]' "
                f"(or pass --no-plots to write only the JSON and the table): {error}")
    return None


def write_json(path: Path, payload: dict) -> None:
    """Writes ``payload`` (NaN as null) atomically: a run cut mid-write keeps the previous file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(_clean(payload), indent=1) + "\n")
    os.replace(partial, path)


def _json_rows(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "busy_steps"} for r in rows]


def cmd_simulate(args: argparse.Namespace) -> int:
    """The paper's comparison: every policy at every rate on the simulator, sized by the profile."""
    from infercept.engine.profiles import load_profile
    cost = load_profile(args.profile)
    if args.kv_capacity_tokens is not None:
        cost.kv_capacity_tokens = args.kv_capacity_tokens
    templates, workload = load_templates(args)
    setup = BenchSetup.from_profile(cost, args.duration, seed=args.seed, block_size=args.block_size,
                                    host_to_device_ratio=args.host_to_device_ratio,
                                    token_ids=not args.counts_only,
                                    enable_prefix_caching=not args.no_prefix_caching,
                                    rank_s_per_predicted_token=args.rank_s_per_predicted_token,
                                    prediction_error=args.prediction_error, predictor=args.predictor)
    print(f"profile {cost.name}: {cost.source}")
    print(f"device KV capacity {cost.kv_capacity_tokens} tokens, host {args.host_to_device_ratio:g}x that, "
          f"token budget S={cost.saturation_tokens}")
    print(f"{workload}: {len(templates)} request templates; window {args.duration:g} s; seed {args.seed}")
    rows = []
    for row in run_grid(templates, args.policies, args.rates, setup):
        rows.append(row)
        done = row["stalled"] if "stalled" in row else f"{row['num_steps']} steps"
        print(f"  done: {row['policy']:>9} @ {row['rate']:g} req/s  ({done})", file=sys.stderr)
    print(format_table([_shown(r, SIMULATE_COLUMNS) for r in rows], SIMULATE_COLUMNS))
    print("normalized_latency: s per output token, tool time excluded; waste: % of device KV memory-time")
    if args.threshold is not None:
        sustained = highest_sustained_rate(rows, args.threshold)
        print(f"highest rate with normalized latency <= {args.threshold:g} s/token:")
        for policy, rate in sustained.items():
            print(f"  {policy:>9}: {rate:.2f} req/s")
    if args.json:
        payload = {
            "command": " ".join(sys.argv),
            # The figures are virtual-clock results (machine-independent); the simulator's own
            # speed is not, so the CPU is recorded beside them as everywhere else.
            "machine": platform.platform(), "cpu": cpu_description(),
            "profile": {"name": cost.name, "source": cost.source},
            "rows": rows,
        }
        # Rows first-class as a list, as the issue asks; context beside it in a sidecar key.
        Path(args.json).write_text(json.dumps(rows if args.rows_only else payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs the grid, saving the JSON after every (policy, rate) row, then the report and plots.

    Optional dependencies are checked before the first run, so a long run never dies at the
    end for want of matplotlib. Until the run completes, ``<name>.json`` holds the rows
    finished so far with ``"complete": false``.
    """
    if not args.no_plots:
        missing = missing_plot_dependency()
        if missing is not None:
            print(f"infercept bench: error: {missing}", file=sys.stderr)
            return 2
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    templates, workload = load_templates(args)
    cost = resolve_cost(args)
    executor = "real" if args.calibrate else args.executor
    setup = BenchSetup(cost=cost, duration_s=args.duration, num_device_blocks=args.num_device_blocks,
                       max_batched_tokens=args.max_batched_tokens or cost.saturation_tokens,
                       executor=executor, seed=args.seed, block_size=args.block_size,
                       host_to_device_ratio=args.host_to_device_ratio,
                       max_running_requests=args.max_running_requests, model=args.model,
                       device=args.device, dtype=args.dtype, max_time_s=args.max_time,
                       token_ids=not args.counts_only,
                       enable_prefix_caching=not args.no_prefix_caching,
                       rank_s_per_predicted_token=args.rank_s_per_predicted_token,
                       prediction_error=args.prediction_error, predictor=args.predictor)
    print(f"{workload}\n{executor} executor; window {args.duration:g} s; seed {args.seed}; device "
          f"pool {setup.num_device_blocks} blocks of {setup.block_size}, host {setup.num_host_blocks}; "
          f"token budget {setup.max_batched_tokens}; profile {cost.name}: {cost.source}")
    timeline: list[dict] = []
    json_path = out_dir / f"{args.name}.json"
    payload: dict[str, Any] = {
        "command": " ".join(["infercept"] + sys.argv[1:]) if args.argv is None else args.argv,
        "machine": machine_description(), "workload": workload,
        "profile": json.loads(cost.to_json()),
        "setup": {k: getattr(setup, k) for k in ("executor", "duration_s", "num_device_blocks",
                                                  "num_host_blocks", "max_batched_tokens", "seed",
                                                  "block_size", "max_running_requests", "device",
                                                  "dtype", "token_ids", "enable_prefix_caching",
                                                  "rank_s_per_predicted_token", "prediction_error",
                                                  "predictor")},
        "complete": False,
        "rows": [],
        "timeline": {"policy": args.timeline_policy, "rate": max(args.rates), "samples": timeline},
    }

    def save_rows(rows_so_far: list[dict]) -> None:
        payload["rows"] = _json_rows(rows_so_far)
        write_json(json_path, payload)

    save_rows([])  # replaces an older run's file at once, and fails early if it cannot write
    try:
        rows = _run(templates, args, setup, executor, timeline, save_rows)
    except BaseException:
        print(f"infercept bench: the run was cut; {json_path} holds the "
              f"{len(payload['rows'])} rows that finished", file=sys.stderr)
        raise
    print(format_table([_shown(r) for r in rows], TABLE_COLUMNS))
    print("normalized_latency: s per output token, tool time excluded; completed_rps: finished / "
          "drained run; throughput_rps: finished within the window / window; waste: % of device "
          "KV memory-time")
    threshold = args.threshold if args.threshold is not None else _default_threshold(rows)
    ratios = sustained_ratios(rows, threshold)
    print(f"highest rate with normalized latency <= {threshold:.4g} s/token:")
    for policy, rate in ratios["sustained_rps"].items():
        print(f"  {policy:>9}: {rate:.3g} req/s")
    if "infercept_over" in ratios:
        print("infercept / other (sustained rate): " + ", ".join(
            f"{p} {v:.2f}x" for p, v in ratios["infercept_over"].items()))
    for rate, w in ratios["waste"].items():
        print(f"waste at {rate} req/s: infercept / fixed = " + ", ".join(
            f"{p} {v:.2f}" for p, v in w["infercept_waste_over"].items())
            + f"  (infercept lowest: {w['infercept_lowest']})")

    payload["comparison"] = ratios
    write_json(json_path, payload)
    if args.calibrate:
        payload["calibration"] = calibrate(templates, args, setup, rows)
    payload["complete"] = True
    write_json(json_path, payload)
    print(f"wrote {json_path}")
    if args.no_plots:
        print("plots skipped (--no-plots)", file=sys.stderr)
        return 0
    for path in write_plots(rows, timeline, args, setup, out_dir, threshold):
        print(f"wrote {path}")
    return 0


def calibrate(templates: list, args: argparse.Namespace, setup: BenchSetup,
              real_rows: list[dict], measured: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Reruns the grid on the simulator: the raw profile, with the measured step overhead, and
    with T_fwd also scaled to the run's measured step times.

    ``measured`` ({"forward_model_error", "step_overhead_s"}) replaces what the real rows' busy
    steps would give, for rows read back from a results file (which keeps no busy steps).
    """
    if measured is None:
        measured = {"forward_model_error": forward_model_error(real_rows, setup.pool_cost()),
                    "step_overhead_s": step_overhead_s(real_rows)}
    forward_error, overhead_s = measured["forward_model_error"], measured["step_overhead_s"]
    report: dict[str, Any] = {"forward_model_error": forward_error, "step_overhead_s": overhead_s}
    if all("mean_runner_s" in r for r in real_rows):
        report["mean_runner_s"] = {f"{r['policy']}@{r['rate']:g}": r["mean_runner_s"] for r in real_rows}
        report["mean_step_s"] = {f"{r['policy']}@{r['rate']:g}": r["mean_step_s"] for r in real_rows}
    print(f"\ncalibration: T_fwd model vs the runner's measured step times: "
          f"{100 * forward_error:+.1f}%; engine overhead outside the runner "
          f"{1e3 * overhead_s:.2f} ms per busy step")
    with_overhead = with_step_overhead(setup.cost, overhead_s)
    models = [("profile", setup.cost), ("profile+overhead", with_overhead)]
    if not math.isnan(forward_error) and forward_error > -1:
        # predicted = (1 + error) x measured, so the run's forward took 1 / (1 + error) x T_fwd.
        models.append(("measured T_fwd+overhead",
                       with_step_overhead(with_forward_scale(setup.cost, 1 / (1 + forward_error)),
                                          overhead_s)))
    for label, cost in models:
        sim_setup = BenchSetup(**{**setup.__dict__, "cost": cost, "executor": "sim", "_loaded": None})
        sim_rows = _run(templates, args, sim_setup, f"sim ({label})", None)
        errors = calibration_errors(real_rows, sim_rows)
        report[label] = {"errors": errors, "sim_rows": sim_rows}
        print(f"simulator ({label}) relative error: "
              + "; ".join(f"{m} mean |e| {100 * errors[m]['mean_abs']:.1f}%, max {100 * errors[m]['max_abs']:.1f}%"
                          for m in ("completed_rps", "normalized_latency")))
        print(format_table(errors["rows"], ["policy", "rate", "real_completed_rps", "sim_completed_rps",
                                            "completed_rps_error", "real_normalized_latency",
                                            "sim_normalized_latency", "normalized_latency_error"]))
    return report


def write_plots(rows: list[dict], timeline: list[dict], args: argparse.Namespace,
                setup: BenchSetup, out_dir: Path, threshold: float) -> list[Path]:
    """The latency, waste and (when sampled) timeline PNGs; returns their paths."""
    from infercept.bench.plots import plot_latency, plot_programs, plot_timeline, plot_waste
    stem = args.name
    files = [plot_latency(rows, out_dir / f"{stem}_latency.png",
                          f"normalized latency vs rate ({setup.executor})",
                          None if math.isnan(threshold) else threshold),
             plot_waste(rows, out_dir / f"{stem}_waste.png")]
    if any(r.get("num_resumed_turns") for r in rows):  # multi-turn: the agent view
        files.append(plot_programs(rows, out_dir / f"{stem}_programs.png",
                                   f"agent programs vs rate ({setup.executor})"))
    if timeline:
        files.append(plot_timeline(timeline, out_dir / f"{stem}_timeline.png",
                                   f"memory timeline: {args.timeline_policy} at {max(args.rates):g} req/s "
                                   f"({setup.executor})", setup.num_device_blocks))
    return files


def cmd_profile(args: argparse.Namespace) -> int:
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    from infercept.bench.profile import ProfileRequest, describe, measure_profile
    request = ProfileRequest(args.model, args.dtype, args.device, args.block_size,
                             args.num_device_blocks, args.kv_capacity_tokens)
    cost, cache_path = measure_profile(request)
    print(describe(cost))
    print(f"wrote {cache_path} (read by engines at start-up)")
    if args.out:
        cost.save(args.out)
        print(f"wrote {args.out}")
    return 0


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """--workload and what agent workloads and the simulator's token ids take (both commands)."""
    parser.add_argument("--workload", choices=WORKLOADS, default="mixed",
                        help="mixed: the paper's trace (--trace) or its six types (--generate N); "
                             "coding, function-calling, chat: multi-turn agent programs "
                             "(docs/workloads.md); agents: the three mixed")
    parser.add_argument("--apps", type=int, default=2,
                        help="agent workloads: apps per shape (programs of an app share a prefix)")
    parser.add_argument("--counts-only", action="store_true",
                        help="sim: requests carry token counts, not ids (the prefix cache idles)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="turn the core's prefix cache off for every policy")
    parser.add_argument("--rank-s-per-predicted-token", type=non_negative, default=0.0, metavar="S",
                        help="rank the queue by predicted remaining output, LAMPS-style: a request's "
                             "FCFS key plus S seconds per predicted token (0: FCFS, the paper's order)")
    parser.add_argument("--prediction-error", type=non_negative, default=0.0, metavar="SIGMA",
                        help="the oracle predictor's error: true count x exp(N(0, SIGMA))")
    parser.add_argument("--predictor", choices=PREDICTORS, default="oracle",
                        help="with ranking, who predicts output lengths: oracle (the script's true "
                             "count, off by --prediction-error) or learned (the core's online "
                             "predictor, from finished programs of the same app and turn)")
    parser.set_defaults(parser=parser)


def non_negative(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def add_parsers(sub: argparse._SubParsersAction, floats, policies) -> None:
    """Registers `simulate`, `bench` and `profile` on the CLI's subparsers."""
    sim = sub.add_parser("simulate", help="compare intercept policies on a trace with the simulated executor")
    source = sim.add_mutually_exclusive_group()
    source.add_argument("--trace", help="workload trace (JSON, format of shared/workloads)")
    source.add_argument("--generate", type=int, metavar="N",
                        help="N templates of the paper's six types (mixed) or N agent programs")
    _add_workload_arguments(sim)
    sim.set_defaults(context=None, time_scale=1.0)
    sim.add_argument("--profile", default="gptj-6b-a100", help="built-in profile name or profile JSON path")
    sim.add_argument("--rates", type=floats, default=[1.0, 2.0, 3.0, 4.0], help="request rates, req/s")
    sim.add_argument("--policies", type=policies, default=list(POLICY_NAMES))
    sim.add_argument("--duration", type=float, default=1800.0, help="arrival window, seconds")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--block-size", type=int, default=16)
    sim.add_argument("--kv-capacity-tokens", type=int, default=None,
                     help="override the profile's device KV capacity (tokens)")
    sim.add_argument("--host-to-device-ratio", type=float, default=2.0)
    sim.add_argument("--threshold", type=float, default=None,
                     help="also print the highest rate each policy sustains under this normalized latency")
    sim.add_argument("--json", default=None, help="write the rows as JSON here")
    sim.add_argument("--rows-only", action="store_true", help="write only the list of rows to --json")
    sim.set_defaults(func=cmd_simulate)

    bench = sub.add_parser("bench", help="the policies side by side on a workload, real or simulated")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--trace", help="workload trace (JSON, format of shared/workloads)")
    source.add_argument("--generate", type=int, metavar="N",
                        help="N templates from the built-in generator of the paper's six types "
                             "(--workload mixed) or N agent programs (default 200)")
    _add_workload_arguments(bench)
    bench.add_argument("--executor", choices=EXECUTORS, default="sim")
    bench.add_argument("--calibrate", action="store_true",
                       help="run real, then sim with the measured profile; report the sim's error")
    bench.add_argument("--rates", type=floats, default=[1.0, 2.0, 3.0, 4.0], help="req/s")
    bench.add_argument("--policies", type=policies, default=list(POLICY_NAMES))
    bench.add_argument("--duration", type=float, default=60.0, help="arrival window, seconds")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--context", type=int, default=None, help="scale contexts to this many tokens")
    bench.add_argument("--time-scale", type=float, default=1.0, help="multiplies tool durations")
    bench.add_argument("--profile", default=None,
                       help="profile name or JSON (default: this machine's, cached or measured now)")
    bench.add_argument("--num-device-blocks", type=int, default=64)
    bench.add_argument("--host-to-device-ratio", type=float, default=2.0)
    bench.add_argument("--max-batched-tokens", type=int, default=None,
                       help="token budget per step (default: the profile's S)")
    bench.add_argument("--max-running-requests", type=int, default=64)
    bench.add_argument("--block-size", type=int, default=16)
    bench.add_argument("--model", default=None, help="real mode: .gguf, HF dir or embedded SmolLM2")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32")
    bench.add_argument("--max-time", type=float, default=None,
                       help="cut a run after this many (real or virtual) seconds; unfinished "
                            "requests count as such")
    bench.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared CPU)")
    bench.add_argument("--threshold", type=float, default=None,
                       help="normalized latency (s/token) for the sustained-rate comparison "
                            "(default: twice the best at the lowest rate)")
    bench.add_argument("--timeline-policy", default="infercept",
                       help="whose run at the highest rate gets the memory timeline")
    bench.add_argument("--out-dir", default="bench_out")
    bench.add_argument("--name", default="bench", help="file stem of the outputs")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("--no-plots", action="store_true",
                       help="write the JSON and the table only (no matplotlib needed)")
    bench.set_defaults(func=cmd_bench, argv=None)

    prof = sub.add_parser("profile", help="measure T_fwd, T_swap and S on this machine; write the profile")
    prof.add_argument("--model", default=None)
    prof.add_argument("--dtype", default="float32")
    prof.add_argument("--device", default="auto")
    prof.add_argument("--block-size", type=int, default=16)
    prof.add_argument("--num-device-blocks", type=int, default=400,
                      help="scratch KV pool the measurement runs in")
    prof.add_argument("--kv-capacity-tokens", type=int, default=None,
                      help="device KV capacity to record (default: the scratch pool's)")
    prof.add_argument("--threads", type=int, default=None)
    prof.add_argument("--out", default=None, help="also write the profile here")
    prof.set_defaults(func=cmd_profile)
