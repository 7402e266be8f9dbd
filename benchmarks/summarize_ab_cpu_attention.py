"""Tables of a before/after run of benchmarks/ab_cpu_attention.sh: per thread count, batch and
context, the fastest turn's kernel-alone milliseconds (the widest body each tree has: avx512,
else avx2), one layer's attention and
a whole step through Python, for the base and the new tree, and base / new.

    python benchmarks/summarize_ab_cpu_attention.py /tmp/ab_cpu_attention
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import sys

_KERNEL_LINE = re.compile(r"^(\w+)\s+batch\s+(\d+) context\s+(\d+): min\s+([\d.]+) ms")
_TAG = re.compile(r"_(base|new)_t(\d+)_r\d+\.")


def _fastest(out: pathlib.Path) -> dict:
    """{(threads, tree, measure, batch, context): fastest ms over the rounds}."""
    best: dict = collections.defaultdict(lambda: float("inf"))
    for path in out.glob("kernel_*_t*_r*.txt"):
        tree, threads = _TAG.search(path.name).groups()
        matches = [m for m in map(_KERNEL_LINE.match, path.read_text().splitlines()) if m]
        body = "avx512" if any(m.group(1) == "avx512" for m in matches) else "avx2"
        for m in matches:
            if m.group(1) == body:
                key = (int(threads), tree, "kernel", int(m.group(2)), int(m.group(3)))
                best[key] = min(best[key], float(m.group(4)))
    for path in out.glob("python_*_t*_r*.json"):
        tree, threads = _TAG.search(path.name).groups()
        for row in json.loads(path.read_text())["rows"]:
            for measure in ("attention", "step"):
                key = (int(threads), tree, measure, row["batch"], row["context"])
                best[key] = min(best[key], row[f"native_{measure}_ms"])
    return best


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    best = _fastest(out)
    commits = {tree: (out / f"{tree}_commit").read_text().strip()[:7] for tree in ("base", "new")}
    print(f"base {commits['base']}, new {commits['new']}; ms, the fastest of the rounds\n")
    cells = sorted({(b, c) for (_, _, _, b, c) in best})
    for threads in sorted({t for (t, *_) in best}):
        print(f"### OMP_NUM_THREADS={threads}\n")
        print("| batch | context | kernel base | kernel new | ratio | attention base | "
              "attention new | ratio | step base | step new | ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for batch, context in cells:
            cols = [str(batch), str(context)]
            for measure in ("kernel", "attention", "step"):
                base = best[(threads, "base", measure, batch, context)]
                new = best[(threads, "new", measure, batch, context)]
                digits = 1 if measure == "step" else 4
                cols += [f"{base:.{digits}f}", f"{new:.{digits}f}", f"{base / new:.2f}x"]
            print("| " + " | ".join(cols) + " |")
        print()


if __name__ == "__main__":
    main()
