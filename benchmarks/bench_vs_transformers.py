"""InferCept's engine against transformers' ``generate`` on the same weights, side by side.

SmolLM2-135M-Instruct (the embedded GGUF) in float32 on this machine's CPU: batches of 1 and 32
prompts of 256 tokens, 128 new tokens each (greedy, EOS ignored so every run does the same
work). Both sides run in one process, alternating, and the best of ``--repeats`` runs of each is
kept (the machine is shared; the best run is the least disturbed). Output: a table of tokens/s
and the ratio ours / transformers, written to benchmarks/results/vs_transformers.{json,md}.

Run: python benchmarks/bench_vs_transformers.py [--batches 1,32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
import transformers

from infercept import EngineConfig, LLMEngine, SamplingParams
from infercept.bench.command import cpu_description
from infercept.weights.default import default_model_path

PROMPT_TOKENS = 256
NEW_TOKENS = 128


def machine() -> str:
    return f"{cpu_description()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def prompts(batch: int, vocab: int, seed: int = 0, num_tokens: int = PROMPT_TOKENS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, num_tokens), generator=generator).tolist()


def run_ours(engine: LLMEngine, batch_prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> float:
    """Tokens/s of ``new_tokens`` per prompt (prefill included); bench_decode.py reuses it."""
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=new_tokens)
    start = time.perf_counter()
    ids = [engine.add_request(prompt_token_ids=p, params=params) for p in batch_prompts]
    outputs = engine.run_until_done(ids)
    seconds = time.perf_counter() - start
    assert all(o.num_generated_tokens == new_tokens for o in outputs)
    for request_id in ids:
        engine.release(request_id)
    return len(batch_prompts) * new_tokens / seconds


def run_transformers(model, batch_prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> float:
    """Tokens/s of transformers' ``generate`` (prefill included); bench_decode.py reuses it."""
    input_ids = torch.tensor(batch_prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    assert out.shape[1] == len(batch_prompts[0]) + new_tokens
    return len(batch_prompts) * new_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vs_transformers.json"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    path = default_model_path()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()
    max_batch = max(batches)
    blocks = max_batch * -(-(PROMPT_TOKENS + NEW_TOKENS) // 16)
    engine = LLMEngine(EngineConfig(num_device_blocks=blocks, max_running_requests=max_batch))
    vocab = engine.model.config.vocab_size

    rows = []
    for batch in batches:
        batch_prompts = prompts(batch, vocab)
        ours, theirs = [], []
        run_ours(engine, batch_prompts[:1])  # warm-up of both paths (allocations, kernels)
        run_transformers(reference, batch_prompts[:1])
        for _ in range(args.repeats):
            ours.append(run_ours(engine, batch_prompts))
            theirs.append(run_transformers(reference, batch_prompts))
        row = {"batch": batch, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
               "infercept_tokens_per_s": max(ours), "transformers_tokens_per_s": max(theirs),
               "ratio": max(ours) / max(theirs), "infercept_runs": ours, "transformers_runs": theirs}
        rows.append(row)
        print(f"batch {batch:>3}: infercept {row['infercept_tokens_per_s']:7.1f} tok/s, "
              f"transformers {row['transformers_tokens_per_s']:7.1f} tok/s, ratio {row['ratio']:.2f}x",
              flush=True)
    engine.shutdown()

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"machine": machine(), "model": path.name, "dtype": "float32", "commit": git,
              "command": "python benchmarks/bench_vs_transformers.py --batches "
                         f"{args.batches} --repeats {args.repeats}",
              "transformers_version": transformers.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# InferCept vs transformers `generate` (CPU, float32)", "",
             f"Machine: {result['machine']}. Model: {path.name}. Commit {git}.", "",
             f"Command: `{result['command']}`", "",
             f"{PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens each, greedy, EOS ignored; best of "
             f"{args.repeats} alternating runs per side.", "",
             "| batch | InferCept tok/s | transformers tok/s | ratio |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['batch']} | {row['infercept_tokens_per_s']:.1f} | "
                     f"{row['transformers_tokens_per_s']:.1f} | {row['ratio']:.2f}x |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
