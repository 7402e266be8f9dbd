"""Cost profiles: the built-in paper profiles by name, or a measured profile from a JSON file."""

from __future__ import annotations

from pathlib import Path

from infercept._core import CostModel


def load_profile(name_or_path: str | Path) -> CostModel:
    """Returns the cost model named by a built-in profile name or a JSON profile path.

    Args:
        name_or_path: "gptj-6b-a100", "vicuna-13b-2xa100" or a path written by
            ``CostModel.save``.

    Raises:
        ValueError: the name is neither a built-in profile nor a readable profile file.
    """
    text = str(name_or_path)
    if text in CostModel.builtin_names():
        return CostModel.builtin(text)
    if Path(text).is_file():
        return CostModel.load(text)
    raise ValueError(
        f"unknown profile {text!r}: not a file and not one of the built-in profiles "
        f"{', '.join(CostModel.builtin_names())}"
    )
