"""Command line: `infercept serve` and `demo` here; `simulate`, `bench` and `profile` in
``infercept.bench.command``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from infercept.policy_names import POLICY_NAMES, canonical_policy


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return values


def _policies(text: str) -> list[str]:
    # ValueError names the accepted policies; a deprecated alias warns and is mapped.
    return [canonical_policy(part) for part in text.split(",") if part]


def _policy(text: str) -> str:
    return canonical_policy(text)  # ValueError names the accepted policies


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from infercept.server import build_engine, engine_spec, serve
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
    if args.tensor_parallel_size != 1:
        config["tensor_parallel_size"] = args.tensor_parallel_size
    if args.rank_s_per_predicted_token:
        config["rank_s_per_predicted_token"] = args.rank_s_per_predicted_token
    if args.learn_output_lengths:
        config["learn_output_lengths"] = True
    if args.enable_prefix_caching is not None:
        from infercept.engine import EngineConfig

        if "enable_prefix_caching" not in {f.name for f in dataclasses.fields(EngineConfig)}:
            raise ValueError("--[no-]enable-prefix-caching: this engine build has no prefix cache")
        config["enable_prefix_caching"] = args.enable_prefix_caching
    if args.replicas is not None:  # N replicas on Ray Serve (infercept.deploy)
        return _serve_replicas(args, config)
    if args.engine_process:  # built in the engine process, once serve() starts it
        engine = engine_spec(args.model, args.policy, args.tools,
                             entry_point_tools=not args.no_entry_point_tools, dtype=args.dtype,
                             **config)
        model_name = Path(engine.config.model).name if engine.config.model else "default"
        tool_names = ", ".join(args.tools) + (" + entry points" if engine.entry_point_tools
                                              else "")
    else:
        engine = build_engine(args.model, args.policy, args.tools,
                              entry_point_tools=not args.no_entry_point_tools, dtype=args.dtype,
                              **config)
        model_name, tool_names = engine.model_name, ", ".join(engine.tools.names)
    name, server_config = _server_config(args)
    mode = "engine process" if args.engine_process else "engine thread"
    print(f"serving {model_name} as {name!r} ({args.policy} policy, {mode}; server tools: "
          f"{tool_names or 'none'}) on http://{args.host}:{args.port}")
    serve(engine, args.host, args.port, server_config, log_level=args.log_level)
    return 0


def _server_config(args: argparse.Namespace) -> tuple[str, object]:
    """The served model name and the ServerConfig of ``infercept serve``'s options."""
    from infercept.server import ServerConfig

    name = args.served_model_name or ("default" if args.model in (None, "default")
                                      else Path(args.model).name)
    tool_prompt = {"auto": None, "always": True, "never": False}[args.tool_prompt]
    api_key = args.api_key or os.environ.get("INFERCEPT_API_KEY") or None
    storage = {key: getattr(args, key) for key in (
        "stored_response_ttl_s", "max_stored_responses", "max_stored_response_bytes")
        if getattr(args, key) is not None}
    return name, ServerConfig(served_model_name=name, paused_ttl_s=args.paused_ttl_s,
                              tool_prompt=tool_prompt, api_key=api_key, **storage)


def _serve_replicas(args: argparse.Namespace, config: dict) -> int:
    """``--replicas N``: N engines on Ray Serve behind one endpoint (docs/deploy.md)."""
    if args.replicas < 1:
        raise ValueError(f"--replicas {args.replicas}: must be >= 1")
    try:
        from infercept.deploy import require_ray, run
        require_ray()
    except ImportError as error:
        print(f"infercept: error: {error}", file=sys.stderr)
        return 2
    from infercept.server import engine_spec

    engine_spec(args.model, args.policy, args.tools, dtype=args.dtype, **config)  # validates
    name, server_config = _server_config(args)
    engine = dict(model=args.model, policy=args.policy, tool_paths=list(args.tools),
                  entry_point_tools=not args.no_entry_point_tools, dtype=args.dtype, **config)
    print(f"serving {args.model} as {name!r} on {args.replicas} Ray Serve replicas "
          f"({args.policy} policy) on http://{args.host}:{args.port}")
    run(engine, server_config, args.replicas, args.host, args.port,
        num_cpus_per_replica=args.num_cpus_per_replica)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infercept", description="InferCept: serving augmented LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    from infercept.bench.command import add_parsers
    add_parsers(sub, _floats, _policies)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the server extra)")
    srv.add_argument("--model", default="default",
                     help="a .gguf file, an HF model directory, or 'default' (embedded SmolLM2)")
    srv.add_argument("--policy", type=_policy, default="infercept", help=", ".join(POLICY_NAMES))
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
    # /v1/responses storage; None: ServerConfig's defaults (3600 s, 1024, 64 MiB).
    srv.add_argument("--stored-response-ttl-s", type=float, default=None,
                     help="how long /v1/responses keeps a stored response (default: 3600)")
    srv.add_argument("--max-stored-responses", type=int, default=None,
                     help="stored responses kept at most, the oldest dropped beyond "
                          "(default: 1024)")
    srv.add_argument("--max-stored-response-bytes", type=int, default=None,
                     help="bytes of stored response JSON kept at most (default: 64 MiB)")
    srv.add_argument("--tool-prompt", choices=["auto", "always", "never"], default="auto",
                     help="describe tools in the system message (auto: when the chat template "
                          "does not render them)")
    srv.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    srv.add_argument("--max-model-len", type=int, default=None)
    srv.add_argument("--kv-cache-bytes", type=int, default=None)
    srv.add_argument("--cost-profile", default=None,
                     help="cost profile name or JSON (default: measured at start-up, cached)")
    srv.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                     help="split the model over N ranks (worker processes; one device each on "
                          "CUDA); N must divide the model's KV heads (docs/tensor_parallel.md)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every /v1 route (default: the "
                          "INFERCEPT_API_KEY environment variable; /health and /metrics stay open)")
    srv.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                     default=None, help="reuse the KV of shared prompt prefixes (the engine's "
                                        "default: on)")
    srv.add_argument("--rank-s-per-predicted-token", type=float, default=0.0, metavar="S",
                     help="rank the queue by arrival + S seconds per output token a request's "
                          "predicted_output_tokens field says it will generate (LAMPS-style; "
                          "default 0: first come, first served)")
    srv.add_argument("--learn-output-lengths", action="store_true",
                     help="with --rank-s-per-predicted-token, rank a request that carries no "
                          "predicted_output_tokens by what finished requests with the same "
                          "prompt head generated (learned online)")
    srv.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                     help="run the engine in its own process, apart from the HTTP layer "
                          "(default); --no-engine-process runs it on a thread of the server "
                          "process")
    srv.add_argument("--replicas", type=int, default=None, metavar="N",
                     help="run N engine replicas on Ray Serve behind one endpoint, follow-ups "
                          "routed to the replica holding their paused context (needs the "
                          "distributed extra; docs/deploy.md)")
    srv.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                     help="Ray CPUs each replica reserves (with --replicas)")
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
