"""The main job: tool-using conversations on the embedded model, then the policies side by side.

Part 1 shows each KV action the policy takes on a paused request, one conversation each
(``demo_actions.py``): a calculator that answers in milliseconds (preserved), a search tool
that takes seconds while other requests wait for memory (swapped), a human-in-the-loop wait
(swapped or discarded), a short chat waiting for its user with the device full and no host
pool (discarded: recomputing it costs less than holding it), and a client tool round trip through the OpenAI server with the
openai client and ``tool_choice="required"`` (resumed in place, no prefill). What it prints of
the KV comes from the engine's records and the server's metrics.

Part 2 replays a scaled-down slice of the paper's mixed workload (``../shared/workloads``) on
the real engine under each policy, with scripted tool calls of the trace's durations (scaled
by ``--time-scale``), and prints throughput, normalized latency and the waste breakdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infercept.engine import EngineConfig, LLMEngine
from infercept.bench.metrics import format_table, summarize
from infercept.model import Tokenizer, load_model
from infercept.model.loader import resolve_model_path
from infercept.policy_names import POLICY_NAMES
from infercept.bench.real_replay import replay
from infercept.bench.workload import load_trace, poisson_arrivals, scale_to_context
from infercept.demo_actions import run_discard_scene, run_engine_scenes, run_server_scene

POLICIES = list(POLICY_NAMES)


def calculator_conversation(question: str) -> list[dict[str, str]]:
    """A chat with two worked examples of the tool-call format, then ``question``."""
    messages = [{"role": "system",
                 "content": "You are a helpful assistant. Use the calculator tool for arithmetic."}]
    for example, expression, result in [("What is 3 + 4?", "3 + 4", "7"),
                                        ("What is 12 * 5?", "12 * 5", "60")]:
        call = '{"name": "calculator", "arguments": {"expression": "%s"}}' % expression
        messages += [{"role": "user", "content": example},
                     {"role": "assistant", "content": f"<tool_call>{call}</tool_call><tool_response>"
                                                      f"{result}</tool_response>The answer is {result}."}]
    return messages + [{"role": "user", "content": question}]


def run_policies(model_path: Path | None, trace: Path, num_device_blocks: int, rate: float,
                 duration_s: float, time_scale: float, context: int, seed: int) -> list[dict]:
    print(f"\n== Part 2: the policies side by side on a scaled-down replay of {trace.name} ==")
    path = resolve_model_path(model_path)
    model, tokenizer = load_model(path), Tokenizer.from_path(path)
    templates = scale_to_context(load_trace(trace), context)
    arrivals = poisson_arrivals(templates, rate, duration_s, seed)
    print(f"{len(arrivals)} requests at {rate} req/s over {duration_s:g} s, contexts scaled to "
          f"<= {context} tokens, tool durations x{time_scale:g}, device KV pool "
          f"{num_device_blocks} blocks of 16 tokens")
    rows = []
    for policy in POLICIES:
        config = EngineConfig(policy=policy, num_device_blocks=num_device_blocks,
                              max_batched_tokens=256)
        with LLMEngine(config, model=model, tokenizer=tokenizer) as engine:
            result = replay(engine, arrivals, duration_s, time_scale=time_scale, seed=seed)
        row = {"policy": policy, **summarize(result.records, duration_s)}
        fractions = result.waste_fractions
        row["waste_fraction"] = fractions["waste_fraction"]
        row["preserve_waste"] = fractions["preserve_waste_fraction"]
        row["recompute_waste"] = fractions["recompute_waste_fraction"]
        row["swap_waste"] = fractions["swap_waste_fraction"]
        # The window is short: report completions over the whole run (until drained).
        row["completed_rps"] = row["num_finished"] / result.end_s
        rows.append(row)
        print(f"  {policy:>9}: done in {result.end_s:.1f} s, normalized latency "
              f"{row['normalized_latency']:.3f} s/token, waste {100 * row['waste_fraction']:.2f}%")
    print()
    print(format_table(rows, ["policy", "completed_rps", "normalized_latency", "p50_latency_s",
                              "p99_latency_s", "waste_fraction", "preserve_waste",
                              "recompute_waste", "swap_waste"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infercept demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: embedded SmolLM2)")
    parser.add_argument("--policy", default="infercept", choices=POLICIES)
    parser.add_argument("--trace", type=Path, default=Path("../shared/workloads/infercept_mixed.json"))
    parser.add_argument("--rate", type=float, default=1.5, help="arrivals per second in part 2")
    parser.add_argument("--duration", type=float, default=8.0, help="arrival window of part 2 (s)")
    parser.add_argument("--time-scale", type=float, default=0.05, help="multiplies tool durations")
    parser.add_argument("--context", type=int, default=192, help="scale contexts to this many tokens")
    parser.add_argument("--num-device-blocks", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-replay", action="store_true", help="run part 1 only")
    args = parser.parse_args(argv)

    path = resolve_model_path(args.model)
    model, tokenizer = load_model(path), Tokenizer.from_path(path)
    print(f"== Part 1: what the policy ({args.policy}) does with a paused request's KV, on "
          f"{path.name} ==")
    run_engine_scenes(model, tokenizer, args.policy)
    run_discard_scene(model, tokenizer, args.policy)
    run_server_scene(model, tokenizer, args.policy)
    if args.skip_replay:
        return 0
    if not args.trace.is_file():
        print(f"\ntrace {args.trace} not found: skipping part 2 (pass --trace)", file=sys.stderr)
        return 0
    run_policies(args.model, args.trace, args.num_device_blocks, args.rate, args.duration,
                 args.time_scale, args.context, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
