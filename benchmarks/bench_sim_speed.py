"""The simulator's speed, simulated seconds per wall second, of two code trees in one run.

Each round runs one replay (the paper-scale setup of ``infercept simulate``: the gptj-6b-a100
profile, the six Table 1 types, token ids, one policy at a time) in a fresh subprocess for
each tree, alternating A, B, A, B, ... so drift on a shared machine falls on both alike. It
reports each tree's median speed and B / A, by wall time and by the process's CPU time (the
better measure on a shared machine, where the wall time also counts other processes' work). The trees are Python source directories (the
``python/`` of a checkout, holding ``infercept/`` with its built ``_core``); the replays must
give the same steps and end time in both (the script checks), so only the wall time differs.

    python benchmarks/bench_sim_speed.py --a /tmp/base/python --b python --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _worker(args: argparse.Namespace) -> None:
    from infercept._core import CostModel
    from infercept.bench.executor import SimulatedExecutor
    from infercept.bench.generator import generate_workload
    from infercept.bench.replay import ReplayEngine, simulated_config
    from infercept.bench.workload import poisson_arrivals

    cost = CostModel.builtin(args.profile)
    templates = generate_workload(args.num_templates, args.seed)
    requests = poisson_arrivals(templates, args.rate, args.duration, args.seed)
    total = {"sim_s": 0.0, "wall_s": 0.0, "cpu_s": 0.0, "num_steps": 0}
    for policy in args.policies.split(","):
        config = simulated_config(cost, policy)
        executor = SimulatedExecutor(cost, config.block_size, token_ids=True, seed=args.seed)
        engine = ReplayEngine(config, cost, executor, seed=args.seed)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = engine.run(requests, args.duration)
        total["wall_s"] += time.perf_counter() - start
        total["cpu_s"] += time.process_time() - start_cpu
        total["sim_s"] += result.end_s
        total["num_steps"] += result.num_steps
    print(json.dumps(total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", help="the first tree's python/ directory (before)")
    parser.add_argument("--b", help="the second tree's python/ directory (after)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", default="gptj-6b-a100")
    parser.add_argument("--policies", default="infercept,vllm-v1,swap")
    parser.add_argument("--rate", type=float, default=2.0, help="requests/s")
    parser.add_argument("--duration", type=float, default=120.0, help="arrival window, s")
    parser.add_argument("--num-templates", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if not (args.a and args.b):
        parser.error("give --a and --b")
    passthrough = ["--profile", args.profile, "--policies", args.policies, "--rate", str(args.rate),
                   "--duration", str(args.duration), "--num-templates", str(args.num_templates),
                   "--seed", str(args.seed)]
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for _ in range(args.rounds):
        for name in ("a", "b"):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(getattr(args, name)),
                       OMP_NUM_THREADS="1")
            out = subprocess.run([sys.executable, __file__, "--worker", *passthrough], env=env,
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    for key in ("sim_s", "num_steps"):
        if len({r[key] for r in runs["a"] + runs["b"]}) != 1:
            raise SystemExit(f"the trees simulate differently ({key}): {runs}")
    speed = {name: statistics.median(r["sim_s"] / r["wall_s"] for r in rs) for name, rs in runs.items()}
    # The process's CPU time: on a shared machine the wall time also counts others' work.
    cpu_speed = {name: statistics.median(r["sim_s"] / r["cpu_s"] for r in rs) for name, rs in runs.items()}
    print(json.dumps({
        "setup": {"profile": args.profile, "policies": args.policies, "rate": args.rate,
                  "duration_s": args.duration, "num_templates": args.num_templates,
                  "rounds": args.rounds},
        "sim_s_per_run": runs["a"][0]["sim_s"], "num_steps_per_run": runs["a"][0]["num_steps"],
        "wall_s": {name: [round(r["wall_s"], 3) for r in rs] for name, rs in runs.items()},
        "sim_s_per_wall_s_median": {name: round(v, 1) for name, v in speed.items()},
        "b_over_a": round(speed["b"] / speed["a"], 3),
        "cpu_s": {name: [round(r["cpu_s"], 3) for r in rs] for name, rs in runs.items()},
        "sim_s_per_cpu_s_median": {name: round(v, 1) for name, v in cpu_speed.items()},
        "cpu_b_over_a": round(cpu_speed["b"] / cpu_speed["a"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
