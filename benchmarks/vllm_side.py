"""The infercept side of talking to real vLLM: its venv, the model in its format, the driver.

vLLM lives in its own venv (benchmarks/vllm_env.sh) because it pins its own torch and
transformers; infercept never imports it. A benchmark writes its requests as JSON, runs
benchmarks/vllm_driver.py under that venv's python, and reads the driver's JSON back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("INFERCEPT_VLLM_VENV", "/work/venv-vllm-cpu"))
DRIVER = Path(__file__).with_name("vllm_driver.py")
# Where the embedded GGUF is written out as a Hugging Face checkpoint (vLLM's CPU backend loads
# float32 safetensors; the Q4_1 GGUF dequantized once, the same weights infercept runs).
DEFAULT_HF_DIR = Path(os.environ.get("INFERCEPT_VLLM_MODEL_DIR",
                                     Path(tempfile.gettempdir()) / "infercept-smollm2-hf-float32"))


def vllm_python(venv: Path = DEFAULT_VENV) -> Path:
    """The vLLM venv's interpreter.

    Raises:
        SystemExit: The venv is missing, with the command that makes it.
    """
    python = venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"no vLLM venv at {venv} ({python} is missing); make it with "
                         f"`bash benchmarks/vllm_env.sh {venv}` or pass --vllm-venv")
    return python


def export_hf_model(out_dir: Path = DEFAULT_HF_DIR) -> Path:
    """The embedded SmolLM2 GGUF as a float32 Hugging Face checkpoint in ``out_dir`` (made once).

    transformers dequantizes the GGUF exactly as infercept's loader does (both give float32
    tensors of the Q4_1 values), so vLLM and infercept run the same weights.
    """
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    import torch
    import transformers

    from infercept.weights.default import default_model_path

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                           local_files_only=True)
    from safetensors.torch import save_file

    # save_pretrained refuses a GGUF-loaded model ("quantized ... not serializable"), though its
    # tensors are plain float32 once loaded: write them and a config without the GGUF marks.
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
             if not (model.config.tie_word_embeddings and name == "lm_head.weight")}
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    # Without it vLLM resolves the bare LlamaModel (no LM head).
    config.architectures = [type(model).__name__]
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out_dir)
    return out_dir


def vllm_env(venv: Path, threads: int, cpu_kv_space_gib: float | None = None) -> dict[str, str]:
    """Environment for the driver: vLLM's CPU settings for ``threads`` OpenMP threads.

    VLLM_CPU_OMP_THREADS_BIND binds the worker's OpenMP threads to cores ``0..threads-1`` (its
    documented form, "0-N"); VLLM_CPU_KVCACHE_SPACE (GiB) sizes the KV pool unless the engine's
    ``num_gpu_blocks_override`` fixes the block count, as the benchmarks do.
    """
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if threads == 1 else f"0-{threads - 1}")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cpu_kv_space_gib or 1:g}")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's CPU docs: preload tcmalloc and Intel's OpenMP (its worker warns without them).
    preload = [str(p) for p in (Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                                venv / "lib" / "libiomp5.so") if p.is_file()]
    if preload and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = ":".join(preload)
    # The driver must not see infercept's packages (its own torch and transformers).
    env.pop("PYTHONPATH", None)
    return env


def run_driver(spec: dict, venv: Path, threads: int, timeout_s: float | None = None,
               keep_dir: Path | None = None) -> dict:
    """Runs the vLLM driver on ``spec`` and returns its result.

    Args:
        spec: The driver's input (see vllm_driver.py).
        venv: The vLLM venv.
        threads: OpenMP threads of vLLM's CPU worker.
        timeout_s: Kill the driver after this long.
        keep_dir: Write the request and result JSON here (else a temporary directory).

    Raises:
        RuntimeError: The driver failed; the message has the end of its output.
    """
    python = vllm_python(venv)
    with tempfile.TemporaryDirectory() as tmp:
        where = keep_dir or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        request_path, result_path = where / "vllm_request.json", where / "vllm_result.json"
        request_path.write_text(json.dumps(spec))
        proc = subprocess.run([str(python), str(DRIVER), str(request_path), str(result_path)],
                              env=vllm_env(venv, threads), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"vLLM driver exited {proc.returncode}; its output ends:\n"
                               + proc.stdout[-6000:])
        if os.environ.get("INFERCEPT_VLLM_VERBOSE"):
            print(proc.stdout[-6000:], file=sys.stderr)
        return json.loads(result_path.read_text())
