"""Decode attention on CPU: the torch gather + SDPA path against the native paged kernel.

For SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64, block_size 16, float32) it times
one layer's decode attention at each (batch, context), and one whole model step of the same
batch, per backend. The attention share of a step is ``num_layers * attention / step``.

Run from the repository root (the 2-core machine is shared, so it repeats and takes medians):

    PYTHONPATH=python python benchmarks/bench_cpu_attention.py --out benchmarks/results/cpu_attention.json

``OMP_NUM_THREADS=1`` runs both backends (torch's and the kernel's OpenMP) on one thread, which
is steadier when other work shares the two cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import time
from typing import Callable

import torch

from infercept.model import KVCache, PagedAttentionMetadata, load_model
from infercept.model.attention import BACKEND_ENV, paged_attention, plan_attention
from infercept.model.cpu_kernels import has_native_decode, native_decode_body

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16


def _interleaved_medians_s(fns: dict[str, Callable[[], object]], repeats: int,
                           warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, calling them in turn (A B A B ...) so that load from
    other work on the shared cores falls on every backend alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        os.environ[BACKEND_ENV] = backend
        return fn()
    return run


def _decode_metadata(batch: int, context: int, num_blocks: int) -> PagedAttentionMetadata:
    """``batch`` single-token sequences of ``context`` tokens on shuffled (non-contiguous) blocks."""
    free = list(range(num_blocks))
    random.Random(0).shuffle(free)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    tables = [[free.pop() for _ in range(blocks_per_seq)] for _ in range(batch)]
    return PagedAttentionMetadata.build([1] * batch, [context] * batch, tables, BLOCK_SIZE)


def time_attention(batch: int, context: int, backends: list[str], repeats: int,
                   num_layers: int = 1) -> dict[str, float]:
    """Median seconds of one layer's decode attention per backend (the plan is built once per
    step and shared by every layer, so it is outside the timed call). With ``num_layers`` > 1
    each timed call runs that many layers in turn, each on its own caches, as a step does (at
    30 layers of batch 32 the caches are far past the last-level cache, so K/V come from
    DRAM), and the time is divided by ``num_layers``."""
    num_blocks = batch * -(-context // BLOCK_SIZE) + 1
    gen = torch.Generator().manual_seed(0)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    caches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
              for _ in range(num_layers)]
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen)
    new_kv = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    metadata = _decode_metadata(batch, context, num_blocks)
    fns = {}
    for backend in backends:
        os.environ[BACKEND_ENV] = backend
        plan = plan_attention(metadata)

        def layers(plan=plan) -> None:
            for key_cache, value_cache in caches:
                paged_attention(query, new_kv, new_kv, key_cache, value_cache, plan,
                                HEAD_DIM ** -0.5)
        fns[backend] = layers
    return {backend: seconds / num_layers
            for backend, seconds in _interleaved_medians_s(fns, repeats).items()}


def time_step(model, batch: int, context: int, backends: list[str],
              repeats: int) -> dict[str, float]:
    """Median seconds of one model forward of ``batch`` decode tokens per backend (plan, 30
    layers, head), the backend chosen when the plan is built inside the forward."""
    num_blocks = batch * -(-context // BLOCK_SIZE) + 1
    kv_cache = KVCache(model.config, num_blocks, BLOCK_SIZE)
    metadata = _decode_metadata(batch, context, num_blocks)
    input_ids = torch.randint(0, model.config.vocab_size, (batch,),
                              generator=torch.Generator().manual_seed(0))
    positions = metadata.positions
    step = functools.partial(model, input_ids, positions, metadata, kv_cache)
    return _interleaved_medians_s({b: _with_backend(b, step) for b in backends}, repeats)


def _machine() -> dict[str, str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return {"lscpu_head": "\n".join(lscpu.splitlines()[:10]),
            "torch": torch.__version__, "torch_threads": str(torch.get_num_threads()),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "loadavg_at_end": " ".join(os.getloadavg() and map(str, os.getloadavg())),
            "python": platform.python_version(),
            "native_body_head_dim_64": native_decode_body(64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--backends", nargs="+", default=["torch", "native"],
                        choices=["torch", "native"])
    parser.add_argument("--attention-repeats", type=int, default=30)
    parser.add_argument("--step-repeats", type=int, default=7)
    parser.add_argument("--no-step", action="store_true", help="time attention only")
    parser.add_argument("--attention-layers", type=int, default=1,
                        help="layers per timed attention call, each on its own caches (30: "
                             "K/V from DRAM as in a step; 1: one cache, reused)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if "native" in args.backends and not has_native_decode():
        parser.error("the native kernel is not in infercept._core; build it or pass "
                     "--backends torch")

    model = None if args.no_step else load_model()
    num_layers = 30 if model is None else model.config.num_layers
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            row: dict = {"batch": batch, "context": context}
            attention_s = time_attention(batch, context, args.backends, args.attention_repeats,
                                         args.attention_layers)
            step_s = ({} if model is None else
                      time_step(model, batch, context, args.backends, args.step_repeats))
            for backend in args.backends:
                row[f"{backend}_attention_ms"] = round(attention_s[backend] * 1e3, 4)
                if model is not None:
                    row[f"{backend}_step_ms"] = round(step_s[backend] * 1e3, 3)
                    row[f"{backend}_attention_share_of_step"] = round(
                        num_layers * attention_s[backend] / step_s[backend], 3)
            if {"torch", "native"} <= set(args.backends):
                row["attention_speedup"] = round(
                    row["torch_attention_ms"] / row["native_attention_ms"], 2)
                if model is not None:
                    row["step_speedup"] = round(row["torch_step_ms"] / row["native_step_ms"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)

    if args.out:
        result = {
            "command": "PYTHONPATH=python python benchmarks/bench_cpu_attention.py "
                       + " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                  for k, v in vars(args).items()
                                  if k not in ("out", "no_step") and v is not None),
            "shapes": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                       "block_size": BLOCK_SIZE, "dtype": "float32", "num_layers": num_layers},
            "machine": _machine(),
            "statistic": "median over repeats after 2 warm-up calls; backends called in turn",
            "rows": rows,
        }
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
