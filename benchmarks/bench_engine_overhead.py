"""Engine overhead per decode step: the step's wall time minus the model's forward.

Runs B greedy requests of the embedded SmolLM2 to a steady decode and times, per step, the
whole ``engine.step()`` and the model's ``forward`` inside it (everything else, scheduling,
building the inputs, sampling, detokenizing, the stop check and the core's update, is the
engine's overhead). Works against whichever ``infercept`` is importable, so the same file
measures before and after a change:

    OMP_NUM_THREADS=1 python benchmarks/bench_engine_overhead.py --batch 1 32 --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from infercept.engine import EngineConfig, LLMEngine
from infercept.sampling import SamplingParams


def measure(engine: LLMEngine, batch: int, steps: int) -> dict:
    model = engine.runner.model
    inner = model.forward
    forward_s: list[float] = []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        forward_s.append(time.perf_counter() - start)
        return out

    model.forward = timed
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps + 8)
    ids = [engine.add_request(f"Tell me about paged attention, request {i}.", params)
           for i in range(batch)]
    while any(engine.get(i).num_generated_tokens < 2 for i in ids):  # prefill done
        engine.step()
    step_s = []
    for _ in range(steps):
        forward_s.clear()
        start = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - start)
        step_s[-1] = (step_s[-1], sum(forward_s))
    model.forward = inner
    for i in ids:
        engine.abort(i)
    walls = [w for w, _ in step_s]
    overheads = [w - f for w, f in step_s]
    return {"batch": batch, "median_step_ms": 1e3 * statistics.median(walls),
            "median_forward_ms": 1e3 * statistics.median(f for _, f in step_s),
            "median_overhead_ms": 1e3 * statistics.median(overheads),
            "overhead_fraction": statistics.median(o / w for (w, _), o in zip(step_s, overheads)),
            "decode_tok_s": batch / statistics.median(walls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(num_device_blocks=1024, num_host_blocks=0,
                                    max_batched_tokens=2048))
    rows = [measure(engine, b, args.steps) for b in args.batch]
    engine.shutdown()
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
