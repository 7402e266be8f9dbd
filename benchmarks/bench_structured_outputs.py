"""Structured outputs: what the grammar masks cost, per token and per engine step, at batch 1
and 32, against unconstrained decoding on the same engine.

Two parts:

1. Masks alone (no model): llguidance matchers over SmolLM2's tokenizer walk a reference
   text of each grammar (a tool call in the server's tag syntax, a nested JSON schema, any
   JSON object); each step computes the masks of B matchers as the engine does
   (``GrammarMatchers.begin_masks`` + ``apply`` on ``[B, V]`` logits). Reported per step:
   the wall time (thread hand-off and the apply included) and the helper thread's computing
   time, and that divided by B (per mask).
2. The engine: B chat requests decode with a JSON-schema structured output, then the same B
   unconstrained (greedy, same prompts); reported per side: steps, ms per step, and for the
   structured side the helper thread's mask time per step and the part of it the engine
   waited for after the forward (what the overlap did not hide).

Run: python benchmarks/bench_structured_outputs.py [--batches 1,32] [--tokens 48] [--reps 3]
     [--out benchmarks/results/structured_outputs.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from infercept import EngineConfig, LLMEngine, SamplingParams, StructuredOutput
from infercept.engine.structured import GrammarMatchers
from infercept.model import Tokenizer
from infercept.server.few_shot import CALCULATOR
from infercept.server.structured import structured_output_for
from infercept.weights.default import default_model_path

from bench_vs_transformers import machine  # noqa: E402  (same folder)

ORDER = {"type": "object", "properties": {
    "customer": {"type": "object", "properties": {"name": {"type": "string"},
                                                  "email": {"type": "string"}},
                 "required": ["name", "email"]},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "quantity": {"type": "integer"},
        "price": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
        "required": ["sku", "quantity", "price"]}},
    "notes": {"type": "string"}}, "required": ["customer", "items", "notes"]}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 32}, "age": {"type": "integer"},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4}},
    "required": ["name", "age", "hobbies"]}


def mask_cases() -> dict[str, tuple[StructuredOutput, str]]:
    """Grammar and a reference text it accepts, by name."""
    call = structured_output_for(None, "required", [CALCULATOR])
    assert call is not None
    order = {"customer": {"name": "Ada Lovelace", "email": "ada@example.com"},
             "items": [{"sku": "A-17", "quantity": 2, "price": 9.5},
                       {"sku": "B-3", "quantity": 1, "price": None}],
             "notes": "Leave it at the door, please."}
    return {
        "tool_call": (call, '<tool_call>{"name": "calculator", "arguments": '
                            '{"expression": "(17 * 23) + 4"}}</tool_call>'),
        "json_schema": (StructuredOutput(json_schema=ORDER), json.dumps(order)),
        "json_object": (StructuredOutput(json_object=True), json.dumps(
            {"city": "Paris", "temperature_c": 21.5, "conditions": ["sunny", "windy"],
             "note": "A longer free-form string with several words in it."})),
    }


def bench_masks(tokenizer: Tokenizer, vocab: int, batch: int, reps: int) -> dict[str, dict]:
    grammars = GrammarMatchers(tokenizer, vocab)
    results = {}
    try:
        for name, (so, text) in mask_cases().items():
            tokens = tokenizer.encode(text, add_special_tokens=False)
            step_s, compute_s = [], []
            for _ in range(reps):
                ids = list(range(batch))
                for i in ids:
                    grammars.attach(i, grammars.build(so))
                logits = torch.zeros(batch, vocab)
                for token in tokens:
                    start, computed = time.perf_counter(), grammars.mask_compute_s
                    grammars.apply(grammars.begin_masks(ids), logits)
                    step_s.append(time.perf_counter() - start)
                    compute_s.append(grammars.mask_compute_s - computed)
                    for i in ids:
                        error = grammars.accept(i, token)
                        assert error is None, error
                for i in ids:
                    grammars.release(i)
            results[name] = {"tokens": len(tokens), "batch": batch,
                             "step_us_median": statistics.median(step_s) * 1e6,
                             "step_us_p90": sorted(step_s)[int(0.9 * len(step_s))] * 1e6,
                             "compute_us_median": statistics.median(compute_s) * 1e6,
                             "per_token_us": statistics.median(compute_s) * 1e6 / batch}
    finally:
        grammars.close()
    return results


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams
               ) -> dict[str, float]:
    grammars = engine.grammars
    masks0, compute0, wait0 = grammars.num_masks, grammars.mask_compute_s, grammars.mask_wait_s
    steps0 = engine.num_steps
    start = time.perf_counter()
    ids = [engine.add_request(prompt_token_ids=p, params=params) for p in prompts]
    outputs = engine.run_until_done(ids)
    seconds = time.perf_counter() - start
    for request_id in ids:
        engine.release(request_id)
    steps = engine.num_steps - steps0
    return {"wall_s": seconds, "steps": steps, "step_ms": 1e3 * seconds / max(steps, 1),
            "tokens": sum(o.num_generated_tokens for o in outputs),
            "masks": grammars.num_masks - masks0,
            "mask_compute_ms_per_step": 1e3 * (grammars.mask_compute_s - compute0) / max(steps, 1),
            "mask_wait_ms_per_step": 1e3 * (grammars.mask_wait_s - wait0) / max(steps, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    parser.add_argument("--reps", type=int, default=3, help="passes over each mask text")
    parser.add_argument("--skip-engine", action="store_true", help="masks alone only")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    tokenizer = Tokenizer.from_path(default_model_path())
    report: dict = {"machine": machine(), "masks": {}, "engine": {}}

    for batch in batches:
        report["masks"][batch] = bench_masks(tokenizer, 49152, batch, args.reps)
        for name, r in report["masks"][batch].items():
            print(f"masks  B={batch:<3d} {name:12s} {r['tokens']:3d} tokens: step "
                  f"{r['step_us_median']:8.0f} us median ({r['step_us_p90']:.0f} p90) with the "
                  f"thread hand-off and apply, {r['compute_us_median']:8.0f} us computing, "
                  f"{r['per_token_us']:6.0f} us per mask")

    if not args.skip_engine:
        engine = LLMEngine(EngineConfig(max_model_len=1024), tokenizer=tokenizer)
        names = ["Ada", "Bob", "Chen", "Dana", "Eve", "Femi", "Gus", "Hana"]
        structured = SamplingParams(temperature=0, max_tokens=args.tokens,
                                    structured_output=StructuredOutput(json_schema=PERSON))
        free = SamplingParams(temperature=0, max_tokens=args.tokens)
        try:
            for batch in batches:
                prompts = [tokenizer.apply_chat_template([{"role": "user", "content":
                           f"Describe a person called {names[i % len(names)]} #{i} as JSON."}])
                           for i in range(batch)]
                run_engine(engine, prompts[:1], free)  # warm-up (and llguidance's tokenizer)
                run_engine(engine, prompts[:1], structured)
                sides = {"unconstrained": run_engine(engine, prompts, free),
                         "json_schema": run_engine(engine, prompts, structured)}
                report["engine"][batch] = sides
                for side, r in sides.items():
                    print(f"engine B={batch:<3d} {side:13s} {r['steps']:4d} steps, "
                          f"{r['step_ms']:7.1f} ms/step, {r['tokens']} tokens; masks "
                          f"{r['mask_compute_ms_per_step']:.2f} ms/step computed, "
                          f"{r['mask_wait_ms_per_step']:.2f} ms/step waited")
        finally:
            engine.shutdown()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
