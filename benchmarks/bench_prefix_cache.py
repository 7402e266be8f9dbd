"""The prefix cache on the real engine: many requests over one long system prompt, cache on and
off, side by side in one process.

N requests share a P-token system prompt and each adds S tokens of its own (the issue's shape:
64 x (1,024 + 64)); all arrive at once and generate one token, so the run is all prefill.
Reported per side: total prefill time (the run's wall time), tokens actually prefilled (from
the engine's counters: context tokens minus cache hits), and TTFT mean/p50/max; then the ratio
off / on. Written to benchmarks/results/prefix_cache.{json,md} with the machine.

Run: python benchmarks/bench_prefix_cache.py [--requests 64] [--system 1024] [--suffix 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from infercept import EngineConfig, LLMEngine, SamplingParams
from infercept.model import Tokenizer, load_model
from infercept.weights.default import default_model_path

from bench_vs_transformers import machine  # noqa: E402  (same folder)


def workload(num_requests: int, system_tokens: int, suffix_tokens: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    system = torch.randint(100, vocab, (system_tokens,), generator=generator).tolist()
    return [system + torch.randint(100, vocab, (suffix_tokens,), generator=generator).tolist()
            for _ in range(num_requests)]


def run(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, float]:
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)
    start = time.perf_counter()
    start_engine_s = engine.now()
    ids = [engine.add_request(prompt_token_ids=p, params=params) for p in prompts]
    outputs = engine.run_until_done(ids)
    seconds = time.perf_counter() - start
    ttfts = [o.first_token_s - start_engine_s for o in outputs]
    stats = engine.stats
    for request_id in ids:
        engine.release(request_id)
    context = sum(len(p) for p in prompts)
    return {"prefill_s": seconds, "context_tokens": context,
            "prefilled_tokens": context - stats["prefix_cache_hits"],
            "cached_tokens": stats["prefix_cache_hits"],
            "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": statistics.median(ttfts),
            "ttft_max_s": max(ttfts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--system", type=int, default=1024)
    parser.add_argument("--suffix", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefix_cache")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = default_model_path()
    model, tokenizer = load_model(path), Tokenizer.from_path(path)
    prompts = workload(args.requests, args.system, args.suffix, model.config.vocab_size)
    results = {}
    for caching in (False, True):
        # Room for every request at once (as vLLM would size it on this machine: all the KV).
        blocks = args.requests * ((args.system + args.suffix) // 16 + 2)
        config = EngineConfig(num_device_blocks=blocks, num_host_blocks=0, max_batched_tokens=2048,
                              max_running_requests=args.requests, enable_prefix_caching=caching)
        engine = LLMEngine(config, model=model, tokenizer=tokenizer)
        results["on" if caching else "off"] = run(engine, prompts)
        engine.shutdown()
    on, off = results["on"], results["off"]
    report = {
        "machine": machine(), "model": path.name,
        "setup": f"{args.requests} requests x ({args.system}-token shared system prompt + "
                 f"{args.suffix} own tokens), one output token each, all arriving at once, "
                 "max_batched_tokens 2048, block size 16",
        "off": off, "on": on,
        "prefill_time_ratio_off_over_on": off["prefill_s"] / on["prefill_s"],
        "ttft_mean_ratio_off_over_on": off["ttft_mean_s"] / on["ttft_mean_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Prefix cache: shared system prompt, cache on vs off",
        "",
        f"Machine: {report['machine']}. Model: {report['model']} (float32).",
        f"Setup: {report['setup']}.",
        "Command: `python benchmarks/bench_prefix_cache.py " +
        f"--requests {args.requests} --system {args.system} --suffix {args.suffix}" +
        (f" --threads {args.threads}" if args.threads else "") + "`",
        "",
        "| cache | prefill time (s) | tokens prefilled | cached tokens | TTFT mean (s) | TTFT p50 (s) | TTFT max (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("off", "on"):
        r = results[name]
        lines.append(f"| {name} | {r['prefill_s']:.2f} | {r['prefilled_tokens']} | {r['cached_tokens']} | "
                     f"{r['ttft_mean_s']:.2f} | {r['ttft_p50_s']:.2f} | {r['ttft_max_s']:.2f} |")
    lines += ["", f"Prefill time off/on: **{report['prefill_time_ratio_off_over_on']:.2f}x**; "
              f"mean TTFT off/on: **{report['ttft_mean_ratio_off_over_on']:.2f}x**."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
