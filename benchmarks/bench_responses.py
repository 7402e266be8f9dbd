"""An agent loop over the Responses API: the TTFT of each tool-result turn when
``previous_response_id`` resumes the paused request in place, against a re-prefill of the same
conversation.

One agent conversation of K questions, each answered through a calculator call: the question
turn ends on a ``function_call`` (the engine request stays paused), the agent runs the tool and
sends the ``function_call_output``; that turn's time to its first ``response.output_text.delta``
is measured. Two modes, each on a fresh server (uvicorn on 127.0.0.1, the embedded SmolLM2,
the official openai client, greedy):

- ``resume``: every turn names the previous response by ``previous_response_id``; the
  tool-result turn resumes the paused request (only the tool output and the next assistant
  header are prefilled).
- ``prefill``: every turn sends the whole conversation with ``store=false``: nothing is held,
  so the tool-result turn prefills everything (through the prefix cache when
  ``--prefix-cache on``).

Both modes see the same conversations token for token, so their answers must agree (checked).
Written to ``--out`` (.json and .md) with the machine.

Run: python benchmarks/bench_responses.py [--questions 4] [--max-tokens 16] [--prefix-cache off]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import httpx
import openai

from infercept import EngineConfig, LLMEngine
from infercept.model import Tokenizer, load_model
from infercept.server import ServerConfig, create_app
from infercept.server.few_shot import CALCULATOR_FUNCTION, FEW_SHOT_INPUT, FEW_SHOT_INSTRUCTIONS
from infercept.server.metrics import parse_metrics
from infercept.tools.calculator import calculate
from infercept.weights.default import default_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from server_harness import ThreadServer  # noqa: E402

from bench_vs_transformers import machine  # noqa: E402  (same folder)

MODEL = "default"
OPERANDS = [(12, 30), (7, 8), (25, 17), (9, 4), (31, 11), (6, 45), (14, 28), (3, 99)]


@dataclasses.dataclass
class ToolTurn:
    """One tool-result turn: its TTFT, its usage, and the answer."""

    question: str
    ttft_s: float
    input_tokens: int
    cached_tokens: int
    answer: str


def _streamed(client: openai.OpenAI, **kwargs: object) -> tuple[object, float | None]:
    """The final response of a streamed request and the time to its first text delta."""
    start = time.perf_counter()
    first = None
    final = None
    for event in client.responses.create(stream=True, **kwargs):
        if event.type == "response.output_text.delta" and first is None:
            first = time.perf_counter() - start
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    if final is None:
        raise RuntimeError("the stream ended without response.completed")
    return final, first


def agent_loop(url: str, mode: str, num_questions: int, max_tokens: int) -> list[ToolTurn]:
    """Runs the agent conversation in ``mode`` ("resume" or "prefill")."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    common = dict(model=MODEL, instructions=FEW_SHOT_INSTRUCTIONS, tools=[CALCULATOR_FUNCTION],
                  temperature=0.0)
    conversation: list[dict] = list(FEW_SHOT_INPUT)
    previous_id: str | None = None
    turns = []
    for a, b in OPERANDS[:num_questions]:
        question = {"role": "user", "content": f"What is {a} + {b}?"}
        if mode == "resume":
            asked, _ = _streamed(client, input=[question] if previous_id else
                                 [*conversation, question], previous_response_id=previous_id,
                                 max_output_tokens=40, **common)
        else:
            asked, _ = _streamed(client, input=[*conversation, question], store=False,
                                 max_output_tokens=40, **common)
        conversation += [question, *[item.model_dump(exclude_none=True) for item in asked.output]]
        calls = [item for item in asked.output if item.type == "function_call"]
        if not calls:
            raise RuntimeError(f"the model answered {question['content']!r} without a call: "
                               f"{asked.output_text!r}")
        result = {"type": "function_call_output", "call_id": calls[0].call_id,
                  "output": calculate(json.loads(calls[0].arguments)["expression"])}
        if mode == "resume":
            answered, ttft = _streamed(client, input=[result], previous_response_id=asked.id,
                                       max_output_tokens=max_tokens, **common)
        else:
            answered, ttft = _streamed(client, input=[*conversation, result], store=False,
                                       max_output_tokens=max_tokens, **common)
        conversation += [result, *[item.model_dump(exclude_none=True)
                                   for item in answered.output]]
        previous_id = answered.id
        usage = answered.usage
        turns.append(ToolTurn(question["content"], ttft if ttft is not None else float("nan"),
                              usage.input_tokens, usage.input_tokens_details.cached_tokens,
                              answered.output_text))
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=4,
                        help=f"tool turns in the conversation (at most {len(OPERANDS)})")
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="max_output_tokens of each tool-result turn")
    parser.add_argument("--prefix-cache", choices=["on", "off"], default="off",
                        help="the engine's prefix cache in both modes (off: a re-prefill "
                             "recomputes the whole conversation)")
    parser.add_argument("--policy", default="infercept")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "responses_resume")
    args = parser.parse_args()
    if not 1 <= args.questions <= len(OPERANDS):
        parser.error(f"--questions {args.questions} must be in 1..{len(OPERANDS)}")
    path = default_model_path()
    model, tokenizer = load_model(path), Tokenizer.from_path(path)
    cache = ({"enable_prefix_caching": args.prefix_cache == "on"}
             if "enable_prefix_caching" in {f.name for f in dataclasses.fields(EngineConfig)}
             else {})
    results: dict[str, list[ToolTurn]] = {}
    reused: dict[str, float] = {}
    for mode in ("resume", "prefill"):
        engine = LLMEngine(EngineConfig(policy=args.policy, max_model_len=2048, **cache),
                           model=model, tokenizer=tokenizer)
        with ThreadServer(create_app(engine, ServerConfig(served_model_name=MODEL))) as server:
            results[mode] = agent_loop(server.url, mode, args.questions, args.max_tokens)
            metrics = parse_metrics(httpx.get(f"{server.url}/metrics", timeout=30).text)
            reused[mode] = metrics['infercept_paused_context_total{outcome="reused"}']
    resume, prefill = results["resume"], results["prefill"]
    same = [r.answer == p.answer for r, p in zip(resume, prefill)]
    report = {"machine": machine(), "model": path.name, "policy": args.policy,
              "prefix_cache": args.prefix_cache, "questions": args.questions,
              "max_tokens": args.max_tokens, "resumed_requests": reused,
              "answers_identical": all(same),
              "turns": {mode: [dataclasses.asdict(t) for t in turns]
                        for mode, turns in results.items()},
              "ratio_prefill_over_resume": [p.ttft_s / r.ttft_s for r, p in zip(resume, prefill)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Responses API agent loop: tool-result turn TTFT, resume vs re-prefill", "",
             f"Machine: {report['machine']}. Model: {report['model']} (float32), policy "
             f"{args.policy}, prefix cache {args.prefix_cache}. The openai client streams each "
             f"turn from the app on 127.0.0.1; {args.questions} calculator questions in one "
             "conversation (few-shot), greedy; TTFT is the time to the first "
             "`response.output_text.delta` of the turn carrying the `function_call_output`.",
             f"Command: `python benchmarks/bench_responses.py --questions {args.questions} "
             f"--max-tokens {args.max_tokens} --prefix-cache {args.prefix_cache}`", "",
             "| turn | input tokens | resume: cached | TTFT resume (s) | TTFT re-prefill (s) | "
             "re-prefill / resume |", "|---|---|---|---|---|---|"]
    for k, (r, p) in enumerate(zip(resume, prefill), start=1):
        lines.append(f"| {k} | {r.input_tokens} | {r.cached_tokens} | {r.ttft_s:.3f} | "
                     f"{p.ttft_s:.3f} | {p.ttft_s / r.ttft_s:.2f}x |")
    lines += ["", f"Requests resumed in place: {reused['resume']:g} (resume), "
                  f"{reused['prefill']:g} (re-prefill). Answers identical in both modes: "
                  f"{'yes' if all(same) else 'NO'}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
