"""Plots recorded results: normalized latency against rate (one line per policy or system) and
the waste breakdown, from the JSON that `infercept simulate --json`, `infercept bench` or
benchmarks/bench_vs_vllm.py write. Several files are drawn on one figure (e.g. every policy
of our engine and real vLLM, from two runs of the same workload).

    python benchmarks/plot_results.py benchmarks/results/agents_sim_gptj_mixed.json \
        --out benchmarks/results/agents_sim_gptj_mixed --title "mixed trace, GPT-J/A100 (sim)" \
        --threshold 0.05
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from infercept.bench.plots import plot_latency, plot_waste


def load_rows(path: Path) -> list[dict]:
    """The rows of a results file: a list of rows, or a payload with a "rows" list. A row is
    labelled by its "system" where it has one (bench_vs_vllm.py: "infercept vllm-v1" is our
    policy, "vllm ..." the real engine), else by its "policy"."""
    data = json.loads(path.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    out = []
    for row in rows:
        if "system" in row:
            row = {**row, "policy": row["system"]}
        if "policy" in row and "rate" in row and "normalized_latency" in row:
            out.append(row)
    if not out:
        raise SystemExit(f"{path}: no rows with policy, rate and normalized_latency")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--out", type=Path, required=True, help="path prefix of the PNGs")
    parser.add_argument("--title", default="")
    parser.add_argument("--threshold", type=float, default=None, help="latency bound to draw (s/token)")
    parser.add_argument("--waste-rate", type=float, default=None,
                        help="rate of the waste breakdown (default: the highest rate)")
    args = parser.parse_args(argv)
    rows = [row for path in args.results for row in load_rows(path)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = [plot_latency(rows, Path(f"{args.out}_latency.png"), args.title, args.threshold)]
    with_waste = [r for r in rows if "waste_fraction" in r]
    if with_waste:
        written.append(plot_waste(with_waste, Path(f"{args.out}_waste.png"), args.waste_rate))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
