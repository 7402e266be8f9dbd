"""Decode tokens/s at tensor_parallel_size N=1 and N=2 on a random-weight Llama, with the time
rank 0 spends in the all-reduces and the plan broadcast.

Writes a random Llama (8 KV heads; sizes below) into a temporary directory, runs B greedy
requests to a steady decode at each N, and times ``--steps`` decode steps. Per N it prints
one JSON line: tokens/s, milliseconds per step, and per step the time rank 0 spends in the
all-reduces, in the plan broadcast and in the closing max of the swap stalls (each includes
waiting for the slowest rank to reach the collective), their counts, and the broadcast bytes.
On a 2-core CPU this is a correctness-and-overhead figure (N ranks share the same cores), not
a speed-up. Run on a quiet machine, with OMP_NUM_THREADS = cores / 2
(rank 0 is this process and keeps its thread setting; the workers take cores / N):

    OMP_NUM_THREADS=1 python benchmarks/bench_tensor_parallel.py --tp 1 2 --batch 8 --steps 64 \\
        --hidden 1024 --layers 8 --intermediate 2816
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from infercept.engine import EngineConfig, LLMEngine
from infercept.engine.tp_executor import TensorParallelExecutor
from infercept.model import Tokenizer
from infercept.sampling import SamplingParams
from infercept.weights.default import default_model_path
from infercept.weights.random_llama import write_random_llama


def measure(model_dir: str, tokenizer: Tokenizer, n: int, batch: int, steps: int,
            prompt_len: int) -> dict:
    config = EngineConfig(model=model_dir, tensor_parallel_size=n, cost_profile="gptj-6b-a100",
                          num_device_blocks=batch * (-(-(prompt_len + steps + 16) // 16)) + 8,
                          max_running_requests=batch)
    with LLMEngine(config, tokenizer=tokenizer) as engine:
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps + 8)
        for i in range(batch):
            engine.add_request(prompt_token_ids=[(i * 131 + j * 7) % 49152 for j in range(prompt_len)],
                               params=params)
        while engine.num_steps < 4:  # prefill and a few decodes before the clock starts
            engine.step()
        comm = engine.runner.group.stats if isinstance(engine.runner, TensorParallelExecutor) else None
        if comm is not None:
            comm.reset()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed_s = time.perf_counter() - start
        row = {"tensor_parallel_size": n, "batch": batch, "steps": steps,
               "tokens_per_s": round(batch * steps / elapsed_s, 1),
               "step_ms": round(1e3 * elapsed_s / steps, 3)}
        if comm is not None:  # read before shutdown's STOP message counts
            row.update({"all_reduce_ms_per_step": round(1e3 * comm.all_reduce_s / steps, 3),
                        "all_reduces_per_step": comm.num_all_reduces / steps,
                        "broadcast_ms_per_step": round(1e3 * comm.broadcast_s / steps, 3),
                        "broadcasts_per_step": comm.num_broadcasts / steps,
                        "broadcast_bytes_per_step": comm.broadcast_bytes // steps,
                        "stall_max_ms_per_step": round(1e3 * comm.max_s / steps, 3)})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    args = parser.parse_args()
    tokenizer = Tokenizer.from_path(default_model_path())
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "torch_threads": torch.get_num_threads(), "hidden": args.hidden,
                      "layers": args.layers, "intermediate": args.intermediate,
                      "heads": args.heads, "kv_heads": args.kv_heads}))
    with tempfile.TemporaryDirectory(prefix="infercept-tp-bench-") as tmp:
        write_random_llama(tmp, hidden_size=args.hidden, num_heads=args.heads,
                           num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                           intermediate_size=args.intermediate, num_layers=args.layers)
        for n in args.tp:
            print(json.dumps(measure(tmp, tokenizer, n, args.batch, args.steps, args.prompt_len)),
                  flush=True)


if __name__ == "__main__":
    main()
