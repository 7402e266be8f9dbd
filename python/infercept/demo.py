"""The main job: tool-using conversations on the embedded model, then the policies side by side.

Part 1 runs a few arithmetic questions through the engine with a real calculator tool. The
model (SmolLM2-135M-Instruct) is shown two worked examples of the ``<tool_call>`` format; the
engine detects each call in the generated text, pauses the request while the tool runs, and
the policy decides what happens to its KV meanwhile. Each conversation is printed with its
calls and the KV states the policy chose.

Part 2 replays a scaled-down slice of the paper's mixed workload (``../shared/workloads``) on
the real engine under each policy, with scripted tool calls of the trace's durations (scaled
by ``--time-scale``), and prints throughput, normalized latency and the waste breakdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from infercept.engine import EngineConfig, LLMEngine, RequestOutput
from infercept.llm import LLM
from infercept.bench.metrics import format_table, summarize
from infercept.model import Tokenizer, load_model
from infercept.model.loader import resolve_model_path
from infercept.policy_names import POLICY_NAMES
from infercept.bench.real_replay import replay
from infercept.sampling import SamplingParams
from infercept.tools import calculator_tool
from infercept.bench.workload import load_trace, poisson_arrivals, scale_to_context

QUESTIONS = ["What is 37 * 91?", "What is 1234 + 4321?", "What is 2 ** 20?", "What is 1000 - 1?"]
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


def print_conversation(question: str, output: RequestOutput) -> None:
    print(f"\nuser: {question}")
    print(f"assistant: {output.text}")
    for call in output.tool_calls:
        outcome = call.output if call.error is None else f"error: {call.error}"
        kv = " -> ".join(call.kv_actions) or "(resumed before the next step)"
        print(f"  intercept: {call.name}({call.arguments}) -> {outcome!r} after "
              f"{1000 * (call.duration_s or 0):.1f} ms; KV while paused: {kv}")


def run_conversations(llm: LLM) -> None:
    print("== Part 1: tool calls through the engine "
          f"(policy {llm.engine.config.policy}, model {llm.engine.model_name}) ==")
    params = SamplingParams(temperature=0.0, max_tokens=64)
    outputs = llm.chat([calculator_conversation(q) for q in QUESTIONS], params)
    for question, output in zip(QUESTIONS, outputs):
        print_conversation(question, output)


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
    parser.add_argument("--skip-replay", action="store_true")
    args = parser.parse_args(argv)

    with LLM(args.model, args.policy, tools=[calculator_tool()], num_device_blocks=256) as llm:
        run_conversations(llm)
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
