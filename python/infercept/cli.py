"""Command line: `infercept simulate`, `bench`, `profile` and `serve`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

from infercept._core import Policy
from infercept.metrics import format_table, highest_sustained_rate
from infercept.profiles import load_profile
from infercept.simulate import SimulationSetup, simulate_grid
from infercept.workload import load_trace

TABLE_COLUMNS = ["policy", "rate", "normalized_latency", "throughput_rps", "mean_latency_s", "p50_latency_s",
                 "p99_latency_s", "waste_fraction", "preserve_waste_fraction", "recompute_waste_fraction",
                 "swap_waste_fraction"]


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return values


def _policies(text: str) -> list[str]:
    names = [part for part in text.split(",") if part]
    for name in names:
        Policy.parse(name)  # raises ValueError naming the accepted policies
    return names


def _policy(text: str) -> str:
    Policy.parse(text)  # raises ValueError naming the accepted policies
    return text


def _percent_row(row: dict) -> dict:
    shown = dict(row)
    for key in TABLE_COLUMNS:
        if key.endswith("waste_fraction"):
            shown[key] = f"{100 * row[key]:.2f}%"
    return shown


def cmd_simulate(args: argparse.Namespace) -> int:
    cost = load_profile(args.profile)
    if args.kv_capacity_tokens is not None:
        cost.kv_capacity_tokens = args.kv_capacity_tokens
    templates = load_trace(args.trace)
    setup = SimulationSetup(cost=cost, duration_s=args.duration, seed=args.seed, block_size=args.block_size,
                            host_to_device_ratio=args.host_to_device_ratio)
    print(f"profile {cost.name}: {cost.source}")
    print(f"device KV capacity {cost.kv_capacity_tokens} tokens, host {args.host_to_device_ratio:g}x that, "
          f"token budget S={cost.saturation_tokens}")
    print(f"trace {args.trace}: {len(templates)} request templates; window {args.duration:g} s; seed {args.seed}")
    rows = []
    for row in simulate_grid(templates, args.policies, args.rates, setup):
        rows.append(row)
        print(f"  done: {row['policy']:>9} @ {row['rate']:g} req/s  ({row['num_steps']} steps)", file=sys.stderr)
    print(format_table([_percent_row(r) for r in rows], TABLE_COLUMNS))
    print("normalized_latency: s per output token, tool time excluded; waste: % of device KV memory-time")
    if args.threshold is not None:
        sustained = highest_sustained_rate(rows, args.threshold)
        print(f"highest rate with normalized latency <= {args.threshold:g} s/token:")
        for policy, rate in sustained.items():
            print(f"  {policy:>9}: {rate:.2f} req/s")
    if args.json:
        payload = {
            "command": " ".join(sys.argv),
            "machine": platform.platform(),
            "profile": {"name": cost.name, "source": cost.source},
            "rows": rows,
        }
        # Rows first-class as a list, as the issue asks; context beside it in a sidecar key.
        Path(args.json).write_text(json.dumps(rows if args.rows_only else payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from infercept.server import ServerConfig, build_engine, serve
    except ImportError as error:
        print(f"infercept: error: serve needs the server extra (pip install 'infercept[server]'): "
              f"{error}", file=sys.stderr)
        return 2
    config = {}
    if args.max_model_len is not None:
        config["max_model_len"] = args.max_model_len
    if args.kv_cache_bytes is not None:
        config["kv_cache_bytes"] = args.kv_cache_bytes
    if args.cost_profile is not None:
        config["cost_profile"] = args.cost_profile
    if args.enable_prefix_caching is not None:
        from infercept.engine import EngineConfig

        if "enable_prefix_caching" not in {f.name for f in dataclasses.fields(EngineConfig)}:
            raise ValueError("--[no-]enable-prefix-caching: this engine build has no prefix cache")
        config["enable_prefix_caching"] = args.enable_prefix_caching
    engine = build_engine(args.model, args.policy, args.tools,
                          entry_point_tools=not args.no_entry_point_tools, dtype=args.dtype,
                          **config)
    name = args.served_model_name or ("default" if args.model in (None, "default")
                                      else Path(args.model).name)
    tool_prompt = {"auto": None, "always": True, "never": False}[args.tool_prompt]
    api_key = args.api_key or os.environ.get("INFERCEPT_API_KEY") or None
    server_config = ServerConfig(served_model_name=name, paused_ttl_s=args.paused_ttl_s,
                                 tool_prompt=tool_prompt, api_key=api_key)
    print(f"serving {engine.model_name} as {name!r} ({args.policy} policy; server tools: "
          f"{', '.join(engine.tools.names) or 'none'}) on http://{args.host}:{args.port}")
    serve(engine, args.host, args.port, server_config, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infercept", description="InferCept: serving augmented LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="compare intercept policies on a trace with the simulated executor")
    sim.add_argument("--trace", required=True, help="workload trace (JSON, format of shared/workloads)")
    sim.add_argument("--profile", default="gptj-6b-a100", help="built-in profile name or profile JSON path")
    sim.add_argument("--rates", type=_floats, default=[1.0, 2.0, 3.0, 4.0], help="request rates, req/s")
    sim.add_argument("--policies", type=_policies, default=["vllm", "discard", "preserve", "swap", "infercept"])
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

    from infercept.bench.command import add_parsers
    add_parsers(sub, _floats, _policies)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the server extra)")
    srv.add_argument("--model", default="default",
                     help="a .gguf file, an HF model directory, or 'default' (embedded SmolLM2)")
    srv.add_argument("--policy", type=_policy, default="infercept", help="vllm, discard, preserve, swap or infercept")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--tools", action="append", default=[], metavar="MODULE:ATTR",
                     help="server-side tools: a Tool, a list of them, or a factory "
                          "(e.g. infercept.tools:calculator_tool); repeatable")
    srv.add_argument("--no-entry-point-tools", action="store_true",
                     help="skip tools registered under the 'infercept.tools' entry points")
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients use (default: 'default' or the file name)")
    srv.add_argument("--paused-ttl-s", type=float, default=120.0,
                     help="how long a context paused on a client tool waits for its follow-up")
    srv.add_argument("--tool-prompt", choices=["auto", "always", "never"], default="auto",
                     help="describe tools in the system message (auto: when the chat template "
                          "does not render them)")
    srv.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--kv-cache-bytes", type=int, default=None)
    srv.add_argument("--cost-profile", default=None,
                     help="cost profile name or JSON (default: measured at start-up, cached)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every /v1 route (default: the "
                          "INFERCEPT_API_KEY environment variable; /health and /metrics stay open)")
    srv.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                     default=None, help="reuse the KV of shared prompt prefixes (the engine's "
                                        "default: on)")
    srv.add_argument("--log-level", default="info")
    srv.set_defaults(func=cmd_serve)

    sub.add_parser("demo", help="the main job: tool calls on the embedded model, then the "
                                       "policies side by side (see `infercept demo --help`)",
                   add_help=False)  # for --help only: main() hands `demo` to its own parser
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        # The demo has its own parser; its options must not be parsed here.
        from infercept.demo import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"infercept: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
