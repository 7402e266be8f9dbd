"""CPU float32 linear layers: the native packed kernel against oneDNN prepacked and F.linear.

At SmolLM2-135M's exact shapes (fused qkv 576 -> 960, o 576 -> 576, fused gate/up 576 -> 3072,
down 1536 -> 576, LM head 576 -> 49152) and rows M = 1 .. 512 it times one call of each:

- ``native``: ``infercept._core.cpu_linear`` on the weight packed by ``pack_linear_weight``,
  through the wrapper ``model/linear.py`` calls (output allocation and DLPack included);
- ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` on ``_reorder_linear_weight``'s layout, as
  ``model/linear.py``'s ``onednn`` choice runs it;
- ``torch``: ``F.linear`` (MKL's sgemm on the plain weight).

Each call reads another copy of the weight, cycled over at least ``--cycle-mib`` per system
(more than the last-level cache, as the model's 538 MB are), so the weight comes from memory as
it does in a decode step. The systems run in turn, call by call (A B C A B C ...), so load from
other work on the shared cores falls on each alike. It prints the median and best ms per call,
the weight GB/s at the best (M <= 4: what bounds it) and the GFLOPS (M >= 8), next to the read
bandwidth measured as bench_decode.py does (best ``torch.sum`` over 1 GiB).

Run from the repository root (under the timing lock on the shared machine):

    PYTHONPATH=python python benchmarks/bench_cpu_linear.py --threads 2 \\
        --out benchmarks/results/cpu_linear_zen4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bench_decode import read_bandwidth_bytes_per_s
from bench_vs_transformers import machine
from infercept.model.cpu_kernels import cpu_linear, pack_linear_weight

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
          "lm_head": (576, 49152)}
ROWS = (1, 2, 4, 8, 16, 32, 128, 512)


def callers(in_features: int, out_features: int, cycle_bytes: int) -> dict:
    """One zero-argument function per system, each call on the next copy of its weight."""
    weight = torch.randn(out_features, in_features) / in_features ** 0.5
    copies = max(2, -(-cycle_bytes // weight.nbytes))
    plain = [weight.clone() for _ in range(copies)]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in plain]
    native = [pack_linear_weight(w) for w in plain]
    state = {"native": 0, "onednn": 0, "torch": 0}

    def nxt(name: str, pool: list[torch.Tensor]) -> torch.Tensor:
        state[name] = (state[name] + 1) % len(pool)
        return pool[state[name]]

    return {
        "native": lambda x: cpu_linear(x, nxt("native", native), out_features),
        "onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, nxt("onednn", onednn), None,
                                                               "none", [], ""),
        "torch": lambda x: F.linear(x, nxt("torch", plain)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="calls per system and cell")
    parser.add_argument("--cycle-mib", type=int, default=160)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth_bytes_per_s()
    print(f"{machine()}; read bandwidth {bandwidth / 1e9:.2f} GB/s (torch.sum over 1 GiB)")
    results = []
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            in_features, out_features = SHAPES[shape]
            systems = callers(in_features, out_features, args.cycle_mib << 20)
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, in_features)
                times: dict[str, list[float]] = {name: [] for name in systems}
                for call in range(args.repeats + 2):
                    for name, fn in systems.items():
                        begin = time.perf_counter()
                        fn(x)
                        if call >= 2:
                            times[name].append(time.perf_counter() - begin)
                weight_bytes = in_features * out_features * 4
                flops = 2 * rows * in_features * out_features
                cell = {"shape": shape, "in_features": in_features, "out_features": out_features,
                        "rows": rows}
                line = f"{shape:8s} M={rows:4d}"
                for name, t in times.items():
                    best, median = min(t), statistics.median(t)
                    cell[name] = {"median_ms": median * 1e3, "best_ms": best * 1e3,
                                  "weight_gb_per_s": weight_bytes / best / 1e9,
                                  "gflops": flops / best / 1e9}
                    rate = (f"{weight_bytes / best / 1e9:5.1f} GB/s" if rows <= 4
                            else f"{flops / best / 1e9:5.0f} GFLOPS")
                    line += f" | {name} {median * 1e3:7.3f} ms (best {best * 1e3:7.3f}, {rate})"
                print(line, flush=True)
                results.append(cell)
            del systems
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine(), "threads": args.threads,
                       "read_bandwidth_bytes_per_s": bandwidth, "cells": results}, f, indent=1)


if __name__ == "__main__":
    main()
