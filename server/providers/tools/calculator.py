"""A calculator tool: arithmetic evaluated by walking the parsed expression.

The expression is parsed with ``ast.parse`` and evaluated by a small walker that knows
numbers, the arithmetic operators, a few math functions and two constants. Nothing is
ever compiled or executed as Python, and every other kind of node (names, attributes,
calls of anything else, subscripts, strings, lambdas...) is refused. Operations whose
result could be astronomically large are refused before they are computed.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Any

from server.providers.tools.base import ProgressReporter, ToolError, ToolSpec

__all__ = ["CalculatorTool", "evaluate"]

Number = int | float

MAX_EXPRESSION_CHARS = 1000
MAX_DEPTH = 100
MAX_EXPONENT = 10_000
# Python refuses to print ints past 4300 digits; stay well below.
MAX_RESULT_DIGITS = 4000
_MAX_RESULT_BITS = int(MAX_RESULT_DIGITS * math.log2(10))

SPEC = ToolSpec(
    name="calculator",
    description=(
        "Evaluate an arithmetic expression exactly and return the result. Supports numbers, "
        "+ - * / // % ** (or ^ for power), parentheses, the functions sqrt, abs, round, min, "
        "max, log (natural, or log(x, base)), sin, cos, tan (radians) and the constants pi "
        "and e."
    ),
    parameters={
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "description": "The expression, e.g. '(3 + 4) * 2 ^ 10' or 'sqrt(2) * pi'.",
            }
        },
        "required": ["expression"],
        "additionalProperties": False,
    },
)


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int):
        raise ToolError("round() needs a whole number of digits")
    return round(x, ndigits)


def _log(x: Number, base: Number | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


# name -> (function, least arguments, most arguments)
_FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    "sqrt": (math.sqrt, 1, 1),
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (min, 1, 50),
    "max": (max, 1, 50),
    "log": (_log, 1, 2),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1),
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Number]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


class CalculatorTool:
    """The ``calculator`` tool: ``{"expression": str}`` → the result as text."""

    def __init__(self) -> None:
        self.spec = SPEC

    async def run(self, arguments: dict[str, Any], progress: ProgressReporter | None = None) -> str:
        """Evaluate ``arguments["expression"]``; raises ``ToolError`` for a bad expression.

        It does no I/O and takes microseconds, so cancelling it has nothing to interrupt.
        """
        expression = arguments.get("expression")
        if not isinstance(expression, str):
            raise ToolError("calculator needs an 'expression' string")
        return format_number(evaluate(expression))


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression; ``ToolError`` for anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    source = expression.replace("^", "**").replace("×", "*").replace("÷", "/").strip()
    if not source:
        raise ToolError("expression is empty")
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        shown = expression if len(expression) <= 80 else expression[:77] + "..."
        raise ToolError(f"cannot parse {shown!r} as arithmetic") from None
    try:
        result = _evaluate(tree.body, 0)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    except (ValueError, TypeError) as exc:
        raise ToolError(f"math error: {exc}") from None
    if isinstance(result, float) and not math.isfinite(result):
        raise ToolError("the result is not a finite number")
    return result


def _evaluate(node: ast.expr, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise ToolError("expression is nested too deeply")
    depth += 1
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ToolError(f"{value!r} is not a number")
        return value
    if isinstance(node, ast.BinOp):
        left = _evaluate(node.left, depth)
        right = _evaluate(node.right, depth)
        if isinstance(node.op, ast.Pow):
            return _checked(_power(left, right))
        operation = _BINARY.get(type(node.op))
        if operation is None:
            raise ToolError(f"operator {type(node.op).__name__} is not supported")
        if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > _MAX_RESULT_BITS + 1:
                raise ToolError(f"the result has more than {MAX_RESULT_DIGITS} digits")
        return _checked(operation(left, right))
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, depth)
        if isinstance(node.op, ast.USub):
            return -operand
        if isinstance(node.op, ast.UAdd):
            return +operand
        raise ToolError(f"operator {type(node.op).__name__} is not supported")
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ToolError(f"unknown name {node.id!r}")
    if isinstance(node, ast.Call):
        return _call(node, depth)
    raise ToolError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _call(node: ast.Call, depth: int) -> Number:
    if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
        allowed = ", ".join(sorted(_FUNCTIONS))
        raise ToolError(f"only these functions can be called: {allowed}")
    if node.keywords:
        raise ToolError("functions take positional arguments only")
    name = node.func.id
    function, least, most = _FUNCTIONS[name]
    if not least <= len(node.args) <= most:
        raise ToolError(f"{name}() takes {least} to {most} arguments")
    arguments = [_evaluate(argument, depth) for argument in node.args]
    if name in ("min", "max"):
        return _checked(function(arguments))
    return _checked(function(*arguments))


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponents larger than {MAX_EXPONENT} are not supported")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        # Estimate the size before paying for it: 9 ** 10000 is fine, 10**9999 ** 9999 not.
        if exponent * math.log2(abs(base)) > _MAX_RESULT_BITS:
            raise ToolError(f"the result has more than {MAX_RESULT_DIGITS} digits")
    result: Number = base**exponent
    if isinstance(result, complex):
        raise ToolError("the result is a complex number")
    return result


def _checked(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > _MAX_RESULT_BITS:
        raise ToolError(f"the result has more than {MAX_RESULT_DIGITS} digits")
    return value


def format_number(value: Number) -> str:
    """Ints as they are, floats to 12 significant digits (``2.0`` prints as ``2``)."""
    if isinstance(value, int):
        return str(value)
    text = format(value, ".12g")
    return "0" if text == "-0" else text
