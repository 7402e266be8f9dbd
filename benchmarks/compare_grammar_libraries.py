"""Mask time per token: xgrammar vs llguidance on SmolLM2's tokenizer (vocab 49,152).

The comparison behind docs/structured_outputs.md. Each grammar is walked over a reference
text: at every token one matcher's mask is computed (batch 1), then the masks of B matchers at
once with the library's batch API (LLExecutor / BatchGrammarMatcher). Both use json.dumps'
compact layout. xgrammar is not an infercept dependency: `pip install xgrammar` first.

Run: python benchmarks/compare_grammar_libraries.py llguidance|xgrammar [--batch 32]
     [--threads 2] [--reps 3]
"""
import argparse
import json
import statistics
import time

from infercept.model import Tokenizer
from infercept.weights.default import default_model_path

V = 49152
WEATHER = {"type": "object", "properties": {
    "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["location", "unit", "days"], "additionalProperties": False}
CALL = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER},
        "required": ["name", "arguments"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "customer": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                 "required": ["name", "email"], "additionalProperties": False},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "quantity": {"type": "integer"},
        "price": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
        "required": ["sku", "quantity", "price"], "additionalProperties": False}},
    "notes": {"type": "string"}}, "required": ["customer", "items", "notes"], "additionalProperties": False}
CASES = {
    "tool_call": (CALL, "<tool_call>", "</tool_call>",
                  {"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius", "days": 3}}),
    "json_object": ({"type": "object"}, "", "",
                    {"city": "Paris", "temperature_c": 21.5, "conditions": ["sunny", "windy"],
                     "note": "A longer free-form string with several words in it, to exercise string tokens."}),
    "nested": (ORDER, "", "", {"customer": {"name": "Ada Lovelace", "email": "ada@example.com"},
                               "items": [{"sku": "A-17", "quantity": 2, "price": 9.5},
                                         {"sku": "B-3", "quantity": 1, "price": None}],
                               "notes": "Leave at the door."}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("library", choices=["llguidance", "xgrammar"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    hf = Tokenizer.from_path(default_model_path())._tokenizer
    B = a.batch
    if a.library == "llguidance":
        import llguidance, llguidance.hf, llguidance.torch as lt
        t0 = time.perf_counter(); lltok = llguidance.hf.from_tokenizer(hf, n_vocab=V)
        print(f"tokenizer init {(time.perf_counter()-t0)*1e3:.0f} ms")
        ex = llguidance.LLExecutor(num_threads=a.threads)
        mask = lt.allocate_token_bitmask(B, V)
        def compile_(schema, pre, post):
            s = json.dumps({**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}})
            lark = f'start: {json.dumps(pre) + " " if pre else ""}body{" " + json.dumps(post) if post else ""}\nbody: %json {s}'
            m = llguidance.LLMatcher(lltok, lark); assert not m.is_error(), m.get_error(); return lark
        new = lambda g: llguidance.LLMatcher(lltok, g)
        fill1 = lambda m: lt.fill_next_token_bitmask(m, mask, 0)
        fillb = lambda ms: lt.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], mask)
        accept = lambda m, t: m.consume_token(t)
    else:
        import xgrammar as xgr
        t0 = time.perf_counter(); info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V)
        print(f"tokenizer init {(time.perf_counter()-t0)*1e3:.0f} ms")
        comp = xgr.GrammarCompiler(info, max_threads=a.threads, cache_enabled=False)
        bm = xgr.BatchGrammarMatcher(max_threads=a.threads)
        mask = xgr.allocate_token_bitmask(B, V)
        def compile_(schema, pre, post):
            parts = [xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))]
            if pre: parts = [xgr.Grammar.from_ebnf(f'root ::= {json.dumps(pre)}'), *parts, xgr.Grammar.from_ebnf(f'root ::= {json.dumps(post)}')]
            return comp.compile_grammar(xgr.Grammar.concat(*parts) if len(parts) > 1 else parts[0])
        new = lambda g: xgr.GrammarMatcher(g)
        fill1 = lambda m: m.fill_next_token_bitmask(mask, 0)
        fillb = lambda ms: bm.batch_fill_next_token_bitmask(ms, mask)
        accept = lambda m, t: m.accept_token(t)
    for name, (schema, pre, post, value) in CASES.items():
        ids = hf.encode(pre + json.dumps(value) + post, add_special_tokens=False)
        t0 = time.perf_counter(); g = compile_(schema, pre, post); compile_s = time.perf_counter() - t0
        per, batch = [], []
        for _ in range(a.reps):
            m = new(g)
            for t in ids:
                t0 = time.perf_counter(); fill1(m); per.append(time.perf_counter() - t0)
                assert (int(mask[0, t // 32]) >> (t % 32)) & 1, (name, t, hf.decode([t]))
                assert accept(m, t)
            ms = [new(g) for _ in range(B)]
            for t in ids:
                t0 = time.perf_counter(); fillb(ms); batch.append(time.perf_counter() - t0)
                for mm in ms: accept(mm, t)
        per.sort()
        print(f"{a.library:10s} {name:11s} tokens {len(ids):3d} compile {compile_s*1e3:6.1f} ms | mask/token "
              f"median {statistics.median(per)*1e6:6.0f} us p90 {per[int(.9*len(per))]*1e6:6.0f} us "
              f"max {per[-1]*1e6:7.0f} us | batch {B} step median {statistics.median(batch)*1e6:6.0f} us")


if __name__ == "__main__":
    main()
