"""Tools by name: what they run, how they are described to the model, how long they may take."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnknownToolError(LookupError):
    """The model called a tool that is not registered."""


def _check_positive_s(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value} is outside (0, inf)")


@dataclass(frozen=True)
class Tool:
    """A callable the model may invoke by name.

    Attributes:
        name: Name the model uses in its calls.
        fn: Sync or async callable; it receives the call's arguments as keyword arguments and
            returns the output (a str, or anything JSON-serializable).
        description: What the tool does, shown to the model.
        parameters: JSON schema of the arguments (an "object" schema), or None for none.
        expected_duration_s: Caller's hint of how long a call takes, for the waste model.
        timeout_s: A call still running after this long fails with a timeout error.
    """

    name: str
    fn: Callable[..., Any]
    description: str = ""
    parameters: dict[str, Any] | None = None
    expected_duration_s: float | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tool name={self.name!r} must be a non-empty str")
        if not callable(self.fn):
            raise ValueError(f"tool {self.name!r}: fn={self.fn!r} is not callable")
        if self.parameters is not None and not isinstance(self.parameters, dict):
            raise ValueError(f"tool {self.name!r}: parameters={self.parameters!r} must be a "
                             f"JSON schema dict or None")
        _check_positive_s("expected_duration_s", self.expected_duration_s)
        _check_positive_s("timeout_s", self.timeout_s)

    @property
    def is_async(self) -> bool:
        """Whether calling ``fn`` returns a coroutine (to await) rather than the output."""
        fn = self.fn
        while isinstance(fn, functools.partial):
            fn = fn.func
        return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None))

    def to_openai(self) -> dict[str, Any]:
        """Returns this tool as one entry of the OpenAI ``tools`` list."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters or {"type": "object", "properties": {}},
            },
        }


class ToolRegistry:
    """The tools an engine may run, by name."""

    def __init__(self, tools: list[Tool] | None = None) -> None:
        """Creates a registry holding ``tools``."""
        self._tools: dict[str, Tool] = {}
        for tool in tools or []:
            self.register(tool)

    def register(self, tool: Tool | Callable[..., Any], **kwargs: Any) -> Tool:
        """Adds a tool.

        Args:
            tool: A Tool, or a sync/async callable wrapped into one (named after the
                callable's ``__name__`` unless ``name`` is given, described by its docstring
                unless ``description`` is given).
            **kwargs: Tool fields, only when ``tool`` is a callable.

        Returns:
            The registered Tool.

        Raises:
            ValueError: The name is taken, or the fields are invalid.
        """
        if not isinstance(tool, Tool):
            kwargs.setdefault("name", getattr(tool, "__name__", ""))
            kwargs.setdefault("description", inspect.getdoc(tool) or "")
            tool = Tool(fn=tool, **kwargs)
        elif kwargs:
            raise ValueError(f"fields {sorted(kwargs)} are only for a callable, not a Tool")
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def get(self, name: str) -> Tool:
        """Returns the tool called ``name``.

        Raises:
            UnknownToolError: No tool has that name; the message lists the registered ones.
        """
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(sorted(self._tools)) or "none"
            raise UnknownToolError(f"unknown tool {name!r} (registered: {known})")
        return tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self._tools)

    def to_openai(self) -> list[dict[str, Any]]:
        """Returns the OpenAI ``tools`` list, e.g. for a chat template's ``tools`` variable."""
        return [tool.to_openai() for tool in self._tools.values()]
