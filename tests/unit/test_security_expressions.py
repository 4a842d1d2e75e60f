"""`when` budgets: hostile expressions fail fast with a clear message; normal ones work."""

import time

import pytest

from maestro.dag import expressions
from maestro.dag.templates import Context

CTX = Context(params={"x": "hi", "n": "3"}, outputs={"a": {"coverage": 91}}, run={"id": "r1"})
PHASES = {"a": "Succeeded"}


def evaluate(expr: str) -> bool:
    return expressions.evaluate(expr, CTX, PHASES)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        # The 92-character expression froze the operator for 38.8 s.
        ("3**4000000 * 3**4000000 * 3**4000000 * 3**4000000 > 0", "over 4096 bits"),
        ("9**9**9 > 0", "over 4096 bits"),
        ("2**4000 * 2**4000 > 0", "a product over 4096 bits"),
        ("1 << 10**9", "a shift over 4096 bits"),
        ("'x' * 10**8", "a repetition over 65536"),
        ("[0] * 10**8", "a repetition over 65536"),
        ("'x' * 60000 + 'y' * 60000", "a concatenation over 65536"),
    ],
)
def test_budget_breach_fails_at_once_naming_the_budget(expr: str, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(expressions.BudgetExceeded, match=message) as err:
        evaluate(expr)
    assert "over budget" in str(err.value)
    assert time.monotonic() - started < 1.0  # the bound the issue asks for, generously


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("params.x.ljust(10**8)", "no methods"),
        ("[1 for a in 'x' * 60000 for b in 'x' * 60000]", "comprehensions are not allowed"),
        ("f'{1:>100000000}' == ''", "f-strings are not allowed"),
        ("params.x.__class__", "names starting with _ are not allowed"),
    ],
)
def test_loops_methods_and_formatting_refused_when_parsed(expr: str, message: str) -> None:
    with pytest.raises(expressions.ExpressionError, match=message):
        expressions.parse(expr)
    with pytest.raises(expressions.ExpressionError, match=message):
        evaluate(expr)


def test_percent_formatting_refused() -> None:
    with pytest.raises(expressions.ExpressionError, match="formatting with % is not allowed"):
        evaluate("'%0100000000d' % 1 == ''")


def test_str_of_a_collection_refused() -> None:
    with pytest.raises(expressions.ExpressionError, match=r"str\(\) takes a number"):
        evaluate("str([params.x] * 60000) == ''")


def test_too_many_nodes_refused() -> None:
    with pytest.raises(expressions.ExpressionError, match="too long"):
        expressions.parse(" + ".join(["1"] * 400) + " > 0")


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("params.x == 'hi'", True),
        ("tasks.a.outputs.coverage >= 80 and tasks.a.phase == 'Succeeded'", True),
        ("int(params.n) ** 2 == 9", True),
        ("2 ** 4000 > 10", True),
        ("len(params.x * 100) == 200", True),
        ("str(int(params.n)) + 'x' == '3x'", True),
        ("tasks['a'].outputs.coverage < 50", False),
    ],
)
def test_ordinary_expressions_still_evaluate(expr: str, value: bool) -> None:
    assert evaluate(expr) is value
