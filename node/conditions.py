"""The declarative condition language (no code evaluation): a bottom-layer utility used by
routing rules, the settings that hold them, de-identification's pixel rules, study completion and
the console's rule tester. It depends on nothing of ainode but :mod:`node.errors`.

A condition is written in YAML as one of::

    {all: [COND, ...]}          every condition holds
    {any: [COND, ...]}          at least one holds
    {not: COND}                 the condition does not hold
    {KEYWORD: TEST, ...}        several keywords in one mapping: all must hold

``KEYWORD`` is a DICOM attribute keyword from pydicom's data dictionary (``Modality``,
``StudyDescription``, ...) or ``calling_ae_title`` / ``called_ae_title``. ``TEST`` is a scalar
(shorthand for ``eq``), a list (shorthand for ``in``) or a mapping of operators::

    eq, ne, in, regex, contains, lt, le, gt, ge, exists   and the modifier  ignore_case: true

Multi-valued attributes (e.g. ImageType) match ``eq``/``in``/``regex``/``contains`` when any value
does. A missing or empty attribute fails every operator except ``exists: false`` and ``ne``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.datadict import keyword_dict, tag_for_keyword

from node.errors import ConfigError

AE_KEYWORDS = ("calling_ae_title", "called_ae_title")
OPERATORS = ("eq", "ne", "in", "regex", "contains", "lt", "le", "gt", "ge", "exists")
MODIFIERS = ("ignore_case",)
COMBINATORS = ("all", "any", "not")


class RuleSyntaxError(ConfigError, ValueError):
    """A condition is malformed; ``path`` locates the offending key inside the condition."""

    def __init__(self, path: Sequence[str | int], message: str) -> None:
        self.path = tuple(path)
        self.message = message
        where = ".".join(str(p) for p in self.path)
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Test:
    """One operator applied to one attribute."""

    keyword: str
    op: str
    operand: Any
    ignore_case: bool = False
    pattern: re.Pattern[str] | None = None

    def describe(self) -> str:
        """Tag name and operator, without the attribute's value (safe to log: no PHI)."""
        return f"{self.keyword} {self.op}"


@dataclass(frozen=True)
class All:
    """Every sub-condition holds."""

    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    """At least one sub-condition holds."""

    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    """The sub-condition does not hold."""

    condition: Condition


Condition = Test | All | AnyOf | Not


@dataclass(frozen=True)
class Decision:
    """The outcome of a condition and the test that decided it (for dry runs and logs)."""

    matched: bool
    decided_by: str


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.4)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keyword(keyword: str, path: list[str | int]) -> None:
    if keyword in AE_KEYWORDS:
        return
    if tag_for_keyword(keyword) is None:
        raise RuleSyntaxError(
            [*path, keyword],
            f"{keyword!r} is not a DICOM keyword or combinator"
            f"{_suggest(keyword, [*COMBINATORS, *AE_KEYWORDS, *keyword_dict])}",
        )


def _parse_test(keyword: str, spec: Any, path: list[str | int]) -> Condition:
    if not isinstance(spec, Mapping):
        op = "in" if isinstance(spec, list) else "eq"
        spec = {op: spec}
    ignore_case = bool(spec.get("ignore_case", False))
    tests: list[Condition] = []
    for op, operand in spec.items():
        if op in MODIFIERS:
            continue
        if op not in OPERATORS:
            raise RuleSyntaxError([*path, keyword], f"unknown operator {op!r}{_suggest(str(op), OPERATORS)}")
        tests.append(_make_test(keyword, op, operand, ignore_case, [*path, keyword, op]))
    if not tests:
        raise RuleSyntaxError([*path, keyword], "no operator given")
    return tests[0] if len(tests) == 1 else All(tuple(tests))


def _make_test(keyword: str, op: str, operand: Any, ignore_case: bool, path: list[str | int]) -> Test:
    pattern = None
    if op == "in":
        if not isinstance(operand, list) or not operand:
            raise RuleSyntaxError(path, "expects a non-empty list")
        values = tuple(str(v).casefold() if ignore_case else str(v) for v in operand)
        return Test(keyword, op, frozenset(values), ignore_case)
    if op in ("lt", "le", "gt", "ge"):
        if isinstance(operand, bool) or not isinstance(operand, int | float):
            raise RuleSyntaxError(path, f"expects a number, got {type(operand).__name__}")
        return Test(keyword, op, float(operand))
    if op == "exists":
        if not isinstance(operand, bool):
            raise RuleSyntaxError(path, "expects true or false")
        return Test(keyword, op, operand)
    if isinstance(operand, list | dict) or operand is None:
        raise RuleSyntaxError(path, "expects a single value")
    text = str(operand)
    if op == "regex":
        try:
            pattern = re.compile(text, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise RuleSyntaxError(path, f"invalid regular expression: {exc}") from None
    elif ignore_case:
        text = text.casefold()
    return Test(keyword, op, text, ignore_case, pattern)


def parse_condition(spec: Any, path: Sequence[str | int] = ()) -> Condition:
    """Parse a condition from its YAML form (see the module docstring).

    Raises
    ------
    RuleSyntaxError
        With the path inside the condition and a suggestion for a misspelt operator.
    """
    where = list(path)
    if not isinstance(spec, Mapping) or not spec:
        raise RuleSyntaxError(where, "a condition must be a non-empty mapping")
    parts: list[Condition] = []
    for key, value in spec.items():
        key = str(key)
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                raise RuleSyntaxError([*where, key], "expects a non-empty list of conditions")
            subs = tuple(parse_condition(v, [*where, key, i]) for i, v in enumerate(value))
            parts.append(All(subs) if key == "all" else AnyOf(subs))
        elif key == "not":
            parts.append(Not(parse_condition(value, [*where, key])))
        else:
            _check_keyword(key, where)
            parts.append(_parse_test(key, value, where))
    return parts[0] if len(parts) == 1 else All(tuple(parts))


def to_spec(condition: Condition) -> Any:
    """A condition in its YAML form again (the inverse of :func:`parse_condition`, with the
    shorthands: ``{KEYWORD: value}`` for ``eq``; values compared case-insensitively shown folded)."""
    if isinstance(condition, Not):
        return {"not": to_spec(condition.condition)}
    if isinstance(condition, All | AnyOf):
        return {"all" if isinstance(condition, All) else "any": [to_spec(c) for c in condition.conditions]}
    operand = sorted(condition.operand) if condition.op == "in" else condition.operand
    if condition.op == "eq" and not condition.ignore_case:
        return {condition.keyword: operand}
    test = {condition.op: operand} | ({"ignore_case": True} if condition.ignore_case else {})
    return {condition.keyword: test}


def keywords_of(condition: Condition) -> set[str]:
    """Every attribute keyword a condition reads (to extract headers once)."""
    if isinstance(condition, Test):
        return {condition.keyword}
    if isinstance(condition, Not):
        return keywords_of(condition.condition)
    return set().union(*(keywords_of(c) for c in condition.conditions))


def header_of(ds: Dataset, keywords: set[str], calling_ae_title: str, called_ae_title: str) -> dict[str, Any]:
    """The values of ``keywords`` in ``ds`` (top level), plus the association's AE titles."""
    header: dict[str, Any] = {"calling_ae_title": calling_ae_title, "called_ae_title": called_ae_title}
    for keyword in keywords:
        if keyword in header or keyword not in ds:
            continue
        elem = ds[keyword]
        if elem.VR == "SQ" or elem.value is None:
            continue
        header[keyword] = [str(v) for v in elem.value] if elem.VM > 1 else str(elem.value)
    return header


def _values(raw: Any) -> list[Any]:
    if raw is None or raw == "":
        return []
    if isinstance(raw, list | tuple):
        return [v for v in raw if v is not None and v != ""]
    return [raw]


@dataclass(frozen=True)
class _Value:
    texts: tuple[str, ...]
    folded: tuple[str, ...]
    number: float | None


def prepare(header: Mapping[str, Any]) -> dict[str, _Value]:
    """Normalise a header once (stripped text, case-folded text, first value as a number) so that
    many conditions can be checked against it quickly with :func:`matches`."""
    prepared = {}
    for keyword, raw in header.items():
        values = _values(raw)
        if not values:
            continue
        texts = tuple(str(v).strip() for v in values)
        try:
            number: float | None = float(values[0])
        except (TypeError, ValueError):
            number = None
        prepared[keyword] = _Value(texts, tuple(t.casefold() for t in texts), number)
    return prepared


def _test_prepared(test: Test, header: Mapping[str, _Value]) -> bool:
    value = header.get(test.keyword)
    op = test.op
    if op == "exists":
        return (value is not None) == test.operand
    if value is None:
        return op == "ne"
    if op in ("lt", "le", "gt", "ge"):
        n = value.number
        if n is None:
            return False
        bound = test.operand
        return n < bound if op == "lt" else n <= bound if op == "le" else n > bound if op == "gt" else n >= bound
    if op == "regex":
        search = test.pattern.search  # type: ignore[union-attr]
        for text in value.texts:
            if search(text):
                return True
        return False
    texts = value.folded if test.ignore_case else value.texts
    if op == "eq":
        return test.operand in texts
    if op == "ne":
        return test.operand not in texts
    operand = test.operand
    if op == "in":
        for text in texts:
            if text in operand:
                return True
        return False
    for text in texts:  # contains
        if operand in text:
            return True
    return False


def matches(condition: Condition, header: Mapping[str, _Value]) -> bool:
    """Whether ``condition`` holds for a :func:`prepare`-d header (the fast path of routing)."""
    kind = type(condition)
    if kind is Test:
        return _test_prepared(condition, header)  # type: ignore[arg-type]
    if kind is All:
        for sub in condition.conditions:  # type: ignore[union-attr]
            if not matches(sub, header):
                return False
        return True
    if kind is AnyOf:
        for sub in condition.conditions:  # type: ignore[union-attr]
            if matches(sub, header):
                return True
        return False
    return not matches(condition.condition, header)  # type: ignore[union-attr]


def evaluate(condition: Condition, header: Mapping[str, Any]) -> Decision:
    """Evaluate ``condition`` on ``header`` (keyword -> value; AE titles under their own keys).

    The same operator semantics as :func:`matches` (the header is prepared once), plus which test
    decided the outcome, for dry runs and logs.

    Returns
    -------
    Decision
        Whether it matched, and the test (tag name and operator, never a value) that decided it.
    """
    return _decide(condition, prepare(header))


def _decide(condition: Condition, header: Mapping[str, _Value]) -> Decision:
    if isinstance(condition, Test):
        return Decision(_test_prepared(condition, header), condition.describe())
    if isinstance(condition, Not):
        inner = _decide(condition.condition, header)
        return Decision(not inner.matched, f"not ({inner.decided_by})")
    if isinstance(condition, All):
        decision = Decision(True, "all")
        for sub in condition.conditions:
            decision = _decide(sub, header)
            if not decision.matched:
                return decision
        return decision
    decision = Decision(False, "any")
    for sub in condition.conditions:
        decision = _decide(sub, header)
        if decision.matched:
            return decision
    return decision


def explain_tree(condition: Condition, header: Mapping[str, Any], depth: int = 0) -> list[str]:
    """Every test of ``condition`` with PASS/FAIL, indented by nesting (tag names and operators
    only: no values, so a dry run prints no PHI)."""
    pad = "  " * depth
    verdict = "PASS" if evaluate(condition, header).matched else "FAIL"
    if isinstance(condition, Test):
        return [f"{pad}{condition.describe()}: {verdict}"]
    if isinstance(condition, Not):
        return [f"{pad}not: {verdict}", *explain_tree(condition.condition, header, depth + 1)]
    name = "all" if isinstance(condition, All) else "any"
    lines = [f"{pad}{name}: {verdict}"]
    for sub in condition.conditions:
        lines += explain_tree(sub, header, depth + 1)
    return lines


_TEST_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": ["string", "number", "boolean"], "description": "shorthand for eq"},
        {"type": "array", "description": "shorthand for in"},
        {
            "type": "object",
            "properties": {
                **{op: {} for op in ("eq", "ne", "contains")},
                "in": {"type": "array", "minItems": 1},
                "regex": {"type": "string"},
                **{op: {"type": "number"} for op in ("lt", "le", "gt", "ge")},
                "exists": {"type": "boolean"},
                "ignore_case": {"type": "boolean"},
            },
            "additionalProperties": False,
            "minProperties": 1,
        },
    ]
}
CONDITION_JSON_SCHEMA: dict[str, Any] = {
    "title": "Condition",
    "description": "all/any/not of tests on DICOM keywords, calling_ae_title or called_ae_title",
    "type": "object",
    "minProperties": 1,
    "properties": {
        "all": {"type": "array", "minItems": 1, "items": {"type": "object"}},
        "any": {"type": "array", "minItems": 1, "items": {"type": "object"}},
        "not": {"type": "object"},
    },
    "additionalProperties": _TEST_SCHEMA,
}
"""JSON Schema of a condition, for editors (``ainode config schema``)."""
