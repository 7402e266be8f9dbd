"""A safe arithmetic calculator tool, evaluated over the ``ast`` without ``eval``."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from infercept.tools.registry import Tool

MAX_EXPRESSION_CHARS = 1000
# Integers past this many bits are refused: they cost time and memory but mean nothing to a
# model, and 10,000 bits (~3,000 digits) stays under Python's int-to-str digit limit.
MAX_INT_BITS = 10_000

_BINARY_OPS: dict[type[ast.operator], Callable[[object, object], object]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS: dict[type[ast.unaryop], Callable[[object], object]] = {
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_FUNCTIONS: dict[str, Callable[..., object]] = {
    "abs": abs, "round": round, "min": min, "max": max,
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10,
    "log2": math.log2, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "floor": math.floor, "ceil": math.ceil, "factorial": math.factorial,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_MAX_FACTORIAL_ARG = 1000


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be evaluated."""


def calculate(expression: str) -> str:
    """Evaluates an arithmetic expression.

    Allowed: int and float literals, ``+ - * / // % **``, unary minus and plus, parentheses,
    the constants ``pi`` and ``e``, and the functions abs, round, min, max, sqrt, exp, log,
    log10, log2, sin, cos, tan, floor, ceil, factorial.

    Args:
        expression: e.g. ``"(3 + 4) * 2 ** 10 / sqrt(16)"``.

    Returns:
        The value as text: an int exactly, a float to 15 significant digits.

    Raises:
        CalculatorError: The expression has anything else, is too long, divides by zero, or
            its result would be too large.
    """
    if not isinstance(expression, str):
        raise CalculatorError(f"expression must be a str, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(
            f"expression has {len(expression)} characters, over the limit {MAX_EXPRESSION_CHARS}")
    try:
        # Newlines inside an expression are a syntax error in eval mode; models emit them.
        tree = ast.parse(" ".join(expression.split()), mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"cannot parse {expression!r}: {exc.msg}") from None
    try:
        value = _eval(tree.body)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except (OverflowError, ValueError) as exc:
        raise CalculatorError(f"math error: {exc}") from None
    return str(value) if isinstance(value, int) else format(value, ".15g")


def _check_size(value: object) -> object:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result has over {MAX_INT_BITS} bits, too large")
    return value


def _power(base: object, exponent: object) -> object:
    # Refuse before computing: 10 ** 10 ** 9 would take minutes and gigabytes.
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1:
        if exponent * (abs(base).bit_length() - 1) > MAX_INT_BITS:
            raise CalculatorError(
                f"{base} ** {exponent} would exceed {MAX_INT_BITS} bits, too large")
    return operator.pow(base, exponent)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"only numbers are allowed, got {node.value!r}")
        return node.value
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op is ast.BitXor:
            raise CalculatorError("'^' is not allowed; use ** for powers")
        if op not in _BINARY_OPS:
            raise CalculatorError(f"operator {op.__name__} is not allowed")
        left, right = _eval(node.left), _eval(node.right)
        result = _power(left, right) if op is ast.Pow else _BINARY_OPS[op](left, right)
        if isinstance(result, complex):
            raise CalculatorError("result is a complex number")
        return _check_size(result)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise CalculatorError(f"unknown name {node.id!r}; constants are pi and e")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Call):
        return _call(node)
    raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _call(node: ast.Call) -> int | float:
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
        allowed = ", ".join(sorted(_FUNCTIONS))
        raise CalculatorError(f"unknown function {ast.unparse(node.func)!r}; allowed: {allowed}")
    if node.keywords:
        raise CalculatorError(f"{node.func.id}() takes no keyword arguments")
    name = node.func.id
    args = [_eval(arg) for arg in node.args]
    if name == "factorial" and args and isinstance(args[0], int) and args[0] > _MAX_FACTORIAL_ARG:
        raise CalculatorError(f"factorial({args[0]}) is over the limit {_MAX_FACTORIAL_ARG}")
    try:
        return _check_size(_FUNCTIONS[name](*args))
    except TypeError as exc:
        raise CalculatorError(f"bad arguments to {name}(): {exc}") from None


def calculator_tool(timeout_s: float | None = 5.0) -> Tool:
    """Returns the calculator as a Tool named ``calculator`` taking ``expression``."""
    return Tool(
        name="calculator",
        fn=calculate,
        description="Evaluate an arithmetic expression, e.g. '(3 + 4) * 2 ** 10 / sqrt(16)'.",
        parameters={
            "type": "object",
            "properties": {
                "expression": {"type": "string", "description": "The expression to evaluate."},
            },
            "required": ["expression"],
        },
        timeout_s=timeout_s,
    )
