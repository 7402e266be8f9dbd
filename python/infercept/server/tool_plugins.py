"""Server-side tools from ``module:attr`` paths and the ``infercept.tools`` entry point group.

A target resolves to tools as follows: a ``Tool``; a list or tuple of them; or a factory
called with no arguments that returns either (e.g. ``infercept.tools:calculator_tool``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from collections.abc import Sequence
from typing import Any

from infercept.tools import Tool

ENTRY_POINT_GROUP = "infercept.tools"


def _as_tools(obj: Any, origin: str) -> list[Tool]:
    if isinstance(obj, Tool):
        return [obj]
    if isinstance(obj, (list, tuple)):
        tools = list(obj)
        bad = [t for t in tools if not isinstance(t, Tool)]
        if bad:
            raise ValueError(f"{origin}: expected Tool entries, got {bad[0]!r}")
        return tools
    if callable(obj):
        return _as_tools(obj(), f"{origin}()")
    raise ValueError(f"{origin} is {type(obj).__name__}, not a Tool, a list of Tools or a "
                     "factory returning them")


def load_tool_path(path: str) -> list[Tool]:
    """Tools from ``"package.module:attr"``.

    Raises:
        ValueError: A malformed path, a missing module or attribute, or an object that is
            not tools.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--tools {path!r} must look like 'package.module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--tools {path!r}: cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--tools {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return _as_tools(obj, path)


def load_entry_point_tools() -> list[Tool]:
    """Tools that installed packages register under the ``infercept.tools`` entry points."""
    tools: list[Tool] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        tools.extend(_as_tools(entry.load(), f"entry point {entry.name} = {entry.value}"))
    return tools


def load_tools(tool_paths: Sequence[str] = (), entry_point_tools: bool = True) -> list[Tool]:
    """The installed entry points' tools (when asked), then those of ``tool_paths``."""
    tools: list[Tool] = []
    if entry_point_tools:
        tools.extend(load_entry_point_tools())
    for path in tool_paths:
        tools.extend(load_tool_path(path))
    return tools
