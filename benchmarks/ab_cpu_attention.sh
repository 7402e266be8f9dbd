#!/usr/bin/env bash
# Before/after of the CPU decode-attention kernel in one run, for a shared machine: the old
# tree (BASE, a built checkout of the earlier commit with its _core symlinked into
# python/infercept) and this one take turns (base new base new ...), ROUNDS rounds at each
# thread count, so load from other work falls on both alike. Two measurements per turn:
#   - the kernel alone: each tree's benchmarks/bench_cpu_attention_kernel.cpp compiled against
#     its kernel sources (same flags as the CMake Release build);
#   - one layer's attention and a whole model step through Python:
#     benchmarks/bench_cpu_attention.py --backends native, this tree's script, each tree's _core.
# Then benchmarks/summarize_ab_cpu_attention.py prints the tables (the fastest turn of each).
#
#   BASE=/work/wt-attn-base bash benchmarks/ab_cpu_attention.sh /tmp/ab_cpu_attention
set -euo pipefail
cd "$(dirname "$0")/.."
NEW=$PWD
BASE=${BASE:?set BASE to a built checkout of the commit to compare against}
OUT=${1:-/tmp/ab_cpu_attention}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-1 2}
mkdir -p "$OUT"

for tree in base new; do
  dir=$([[ $tree == base ]] && echo "$BASE" || echo "$NEW")
  # Each tree's own microbenchmark (it names the bodies that tree has) over its kernel sources.
  g++ -O3 -DNDEBUG -std=gnu++17 -fopenmp -I"$dir/cpp/include" -I"$dir/cpp/src" \
    "$dir/benchmarks/bench_cpu_attention_kernel.cpp" "$dir"/cpp/src/cpu_attention*.cpp \
    "$dir/cpp/src/attention_args.cpp" "$dir/cpp/src/tensor_view.cpp" \
    $([[ -f "$dir/cpp/src/cpu_features.cpp" ]] && echo "$dir/cpp/src/cpu_features.cpp") \
    -o "$OUT/kernel_$tree"
done
git -C "$BASE" rev-parse HEAD > "$OUT/base_commit"
git -C "$NEW" rev-parse HEAD > "$OUT/new_commit"

for threads in $THREADS; do
  for round in $(seq "$ROUNDS"); do
    for tree in base new; do
      dir=$([[ $tree == base ]] && echo "$BASE" || echo "$NEW")
      tag="${tree}_t${threads}_r${round}"
      echo "== $tag" >&2
      OMP_NUM_THREADS=$threads "$OUT/kernel_$tree" > "$OUT/kernel_$tag.txt"
      OMP_NUM_THREADS=$threads PYTHONPATH="$dir/python" python "$NEW/benchmarks/bench_cpu_attention.py" \
        --backends native --batches 1 8 32 --contexts 256 512 --attention-repeats 20 \
        --step-repeats 5 --out "$OUT/python_$tag.json" > /dev/null
    done
  done
done
python "$NEW/benchmarks/summarize_ab_cpu_attention.py" "$OUT"
