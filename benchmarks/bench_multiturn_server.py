"""Multi-turn chat through the OpenAI server with the official openai client: the TTFT of each
turn with the prefix cache on and off, side by side in one process.

One conversation of K turns over a long system prompt; each turn re-sends the whole
conversation (as every chat client does), streams the answer and measures the time to its first
content chunk. The server runs on 127.0.0.1 (uvicorn in a thread), the engine on the embedded
SmolLM2. Written to benchmarks/results/multiturn_server.{json,md} with the machine.

Run: python benchmarks/bench_multiturn_server.py [--turns 6] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import openai

from infercept import EngineConfig, LLMEngine
from infercept.model import Tokenizer, load_model
from infercept.server import ServerConfig, create_app
from infercept.weights.default import default_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))
from server_harness import ThreadServer  # noqa: E402

from bench_vs_transformers import machine  # noqa: E402  (same folder)

SYSTEM = ("You are the help desk of a small municipal library. Answer briefly and politely. "
          "Opening hours are 9 to 18 on weekdays and 10 to 14 on Saturdays; loans last three "
          "weeks and can be renewed twice online; the reading room is quiet; printing costs ten "
          "cents a page; lost cards are replaced at the front desk for two euros. ") * 8
QUESTIONS = ["When are you open on Saturday?", "How long can I keep a book?",
             "Can I renew it online?", "What does printing cost?", "I lost my card. What now?",
             "Is the reading room quiet?", "Thanks! Anything else I should know?",
             "One more: can I renew three times?"]


def conversation_ttfts(url: str, turns: int, max_tokens: int) -> list[float]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}]
    ttfts = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        start = time.perf_counter()
        first = None
        text = []
        stream = client.chat.completions.create(model="default", messages=messages, stream=True,
                                                max_tokens=max_tokens, temperature=0.0)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - start
                text.append(chunk.choices[0].delta.content)
        ttfts.append(first if first is not None else time.perf_counter() - start)
        messages.append({"role": "assistant", "content": "".join(text)})
    return ttfts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "multiturn_server")
    args = parser.parse_args()
    path = default_model_path()
    model, tokenizer = load_model(path), Tokenizer.from_path(path)
    results = {}
    for caching in (False, True):
        engine = LLMEngine(EngineConfig(max_model_len=2048, enable_prefix_caching=caching),
                           model=model, tokenizer=tokenizer)
        app = create_app(engine, ServerConfig(served_model_name="default"))
        with ThreadServer(app) as server:
            results["on" if caching else "off"] = conversation_ttfts(server.url, args.turns, args.max_tokens)
            results[f"hits_{'on' if caching else 'off'}"] = engine.stats["prefix_cache_hits"]
    report = {"machine": machine(), "model": path.name, "turns": args.turns, "max_tokens": args.max_tokens,
              "system_prompt_tokens": len(tokenizer.encode(SYSTEM)),
              "ttft_off_s": results["off"], "ttft_on_s": results["on"],
              "cached_tokens_on": results["hits_on"],
              "ratio_off_over_on": [a / b for a, b in zip(results["off"], results["on"])]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Multi-turn chat through the server: turn TTFT, prefix cache on vs off", "",
             f"Machine: {report['machine']}. Model: {report['model']} (float32). The openai client "
             f"streams each turn from `infercept serve`'s app on 127.0.0.1; one conversation, "
             f"{args.turns} turns, a {report['system_prompt_tokens']}-token system prompt, each turn "
             f"re-sending the whole conversation, greedy, at most {args.max_tokens} tokens per answer.",
             f"Command: `python benchmarks/bench_multiturn_server.py --turns {args.turns} "
             f"--max-tokens {args.max_tokens}`", "",
             "| turn | TTFT off (s) | TTFT on (s) | off / on |", "|---|---|---|---|"]
    for k, (a, b) in enumerate(zip(results["off"], results["on"]), start=1):
        lines.append(f"| {k} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    lines += ["", f"Prompt tokens served from the cache with it on: {results['hits_on']}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
