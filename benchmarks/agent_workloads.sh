#!/usr/bin/env bash
# Every policy on the paper's mixed trace and on each agent shape (docs/workloads.md), on the
# simulator at the paper's setup (GPT-J-6B / A100 profile, plain and +attn), then the same
# comparison on the real CPU engine scaled for SmolLM2. Writes benchmarks/results/agents_*.json
# (and the bench's tables and plots); the latency bound (--threshold, s per output token) and
# the rate grids were chosen before the recorded runs, from a 120 s sweep (about 4x the unloaded
# normalized latency of 0.010-0.0125 s/token on this profile).
#
#   bash benchmarks/agent_workloads.sh            # the full runs (simulator: minutes of CPU;
#                                                 # real CPU engine: hours, on a quiet machine)
#   SMALL=1 bash benchmarks/agent_workloads.sh    # a quick check that every command works
#   POLICIES=vllm-0.2,vllm-v1,vllm-v1-offload,continuum,discard,preserve,swap,infercept \
#     bash benchmarks/agent_workloads.sh          # once the core has those policies
#   PARTS=sim or PARTS=real                       # only one half
set -euo pipefail
cd "$(dirname "$0")/.."
POLICIES=${POLICIES:-vllm,discard,preserve,swap,infercept}
TRACE=${TRACE:-../shared/workloads/infercept_mixed.json}
OUT=${OUT:-benchmarks/results}
PARTS=${PARTS:-sim,real}
THRESHOLD=${THRESHOLD:-0.05}
mkdir -p "$OUT"

if [[ -n "${SMALL:-}" ]]; then
  SIM_DURATION=20; SIM_RATES_CODING=1,2; SIM_RATES_FC=2,4; SIM_RATES_CHAT=2,4; SIM_RATES_MIXED=1,2
  PROFILES=gptj-6b-a100; REAL_DURATION=10; REAL_RATES=0.3; REAL_MAX_TIME=40; PROGRAMS=20
else
  SIM_DURATION=600; SIM_RATES_CODING=0.5,1,2,3,4,6; SIM_RATES_FC=2,4,8,12,16,24
  SIM_RATES_CHAT=2,4,8,12,16; SIM_RATES_MIXED=1,2,3,4,5
  PROFILES="gptj-6b-a100 gptj-6b-a100+attn"; REAL_DURATION=60; REAL_RATES=0.1,0.3,0.5,0.7
  REAL_MAX_TIME=200; PROGRAMS=200
fi

if [[ $PARTS == *sim* ]]; then
  for profile in $PROFILES; do
    tag=${profile//+/_}
    python -m infercept.cli simulate --workload mixed --trace "$TRACE" --profile "$profile" \
      --rates "$SIM_RATES_MIXED" --duration "$SIM_DURATION" --policies "$POLICIES" \
      --threshold "$THRESHOLD" --json "$OUT/agents_sim_${tag}_mixed.json"
    for spec in "coding:$SIM_RATES_CODING" "function-calling:$SIM_RATES_FC" "chat:$SIM_RATES_CHAT"; do
      workload=${spec%%:*}; rates=${spec#*:}
      python -m infercept.cli simulate --workload "$workload" --generate "$PROGRAMS" --profile "$profile" \
        --rates "$rates" --duration "$SIM_DURATION" --policies "$POLICIES" \
        --threshold "$THRESHOLD" --json "$OUT/agents_sim_${tag}_${workload}.json"
    done
  done
fi

if [[ $PARTS == *real* ]]; then
  # SmolLM2-135M on the CPU: contexts scaled to 1024 tokens, tools x0.25, 256 device blocks
  # (4096 tokens: about five scaled programs), one torch thread; the profile measured on this
  # machine (cached, or measured at the first run).
  for workload in function-calling coding; do
    python -m infercept.cli bench --workload "$workload" --generate "$PROGRAMS" --executor real \
      --context 1024 --time-scale 0.25 --num-device-blocks 256 --rates "$REAL_RATES" \
      --duration "$REAL_DURATION" --max-time "$REAL_MAX_TIME" --policies "$POLICIES" \
      --threads 1 --device cpu --no-progress --out-dir "$OUT" --name "agents_real_cpu_${workload}"
  done
fi
