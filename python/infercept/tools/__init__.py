"""Tool calling: parse calls from generated text, run them concurrently, learn their durations."""

from infercept.tools.calculator import CalculatorError, calculate, calculator_tool
from infercept.tools.estimator import DurationEstimator
from infercept.tools.parser import (
    ParseResult,
    PatternParser,
    TagParser,
    ToolCall,
    ToolCallError,
    ToolCallParser,
)
from infercept.tools.registry import Tool, ToolRegistry, UnknownToolError
from infercept.tools.runtime import ToolResult, ToolRuntime

__all__ = [
    "CalculatorError",
    "DurationEstimator",
    "ParseResult",
    "PatternParser",
    "TagParser",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolCallParser",
    "ToolRegistry",
    "ToolResult",
    "ToolRuntime",
    "UnknownToolError",
    "calculate",
    "calculator_tool",
]
