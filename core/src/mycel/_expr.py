"""CEL expressions and ``${...}`` templates.

Expressions are compiled once, when the configuration loads, and evaluated
many times. Names in scope are ``input``, ``output`` and ``context``, plus
the functions that plugins contribute.

Query parameters arrive as text while the same id in an event is often a
number. So that ``input.user_id == context.params.user_id`` holds for
``user_id: 123`` as well as ``user_id: "123"``, an equality (``==`` or
``!=``) whose one side is a path under ``context`` and whose other side is a
path or a literal compares the *text* of both sides. Other comparisons keep
CEL's strict typing.

"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import cel
import cel.stdlib as cel_stdlib

from .errors import ExpressionError

__all__ = [
    "Activation",
    "Expression",
    "IndexedEquality",
    "Template",
    "as_text",
]

_TEXT_EQ = "__mycel_text_eq"


def as_text(value: Any) -> str | None:
    """The text a value compares by, or None for values without one.

    ``123``, ``123.0`` and ``"123"`` all give ``"123"``; ``True`` gives
    ``"true"``. Lists, maps and null have no text and never compare equal.

    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, Decimal):
        if value == value.to_integral_value():
            return str(value.quantize(Decimal(1)))
        return str(value.normalize())
    return None


def _text_eq(left: Any, right: Any) -> bool:
    text = as_text(left)
    return text is not None and text == as_text(right)


# A token-level view of CEL, just enough to find ``a == b`` whose operands
# are simple: dotted paths (with [..] subscripts) or literals.
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<string>[rR]?(?:'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"))
    |(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[uU]?)
    |(?P<name>[A-Za-z_][A-Za-z_0-9]*)
    |(?P<op>==|!=|<=|>=|&&|\|\||[-+*/%!<>?:.,()\[\]{}])
    """,
    re.VERBOSE,
)
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z_0-9]*")
_LITERAL_WORDS = {"true", "false", "null"}
_STOP_BEFORE = {"!", "-", "+", "*", "/", "%", "<", ">", "<=", ">=", ".", "]", ")"}


def _tokens(source: str) -> list[tuple[str, str]] | None:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            return None  # leave it to CEL to report
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


def _operand_end(tokens: list[tuple[str, str]], start: int) -> int | None:
    """End (exclusive) of a simple operand starting at ``start``."""
    if start >= len(tokens):
        return None
    kind, text = tokens[start]
    if kind in ("string", "number") or text in _LITERAL_WORDS:
        end = start + 1
    elif kind == "name":
        end = start + 1
        while end < len(tokens):
            if (
                tokens[end][1] == "."
                and end + 1 < len(tokens)
                and (tokens[end + 1][0] == "name")
            ):
                end += 2
            elif (
                tokens[end][1] == "["
                and end + 2 < len(tokens)
                and tokens[end + 1][0] in ("string", "number")
                and tokens[end + 2][1] == "]"
            ):
                end += 3
            else:
                break
        if end < len(tokens) and tokens[end][1] == "(":
            return None  # a function or method call: not simple
    else:
        return None
    return end


def _operand_start(tokens: list[tuple[str, str]], end: int) -> int | None:
    """Start of a simple operand that ends (exclusive) at ``end``."""
    for start in range(end - 1, -1, -1):
        if _operand_end(tokens, start) == end and (
            start == 0 or tokens[start - 1][1] not in _STOP_BEFORE
        ):
            return start
    return None


def _is_context_path(tokens: list[tuple[str, str]], start: int, end: int) -> bool:
    return end - start >= 5 and tokens[start][1] == "context"


def rewrite_text_equality(source: str) -> str:
    """Rewrite ``a == context.x.y`` into a text comparison; see the module."""
    tokens = _tokens(source)
    if tokens is None or not any(t[1] in ("==", "!=") for t in tokens):
        return source
    changed, rewritten = True, False
    while changed:
        changed = False
        for i, (kind, text) in enumerate(tokens):
            if kind != "op" or text not in ("==", "!="):
                continue
            left = _operand_start(tokens, i)
            right_end = _operand_end(tokens, i + 1)
            if left is None or right_end is None:
                continue
            if right_end < len(tokens) and tokens[right_end][1] in (".", "[", "("):
                continue
            if not (
                _is_context_path(tokens, left, i)
                or _is_context_path(tokens, i + 1, right_end)
            ):
                continue
            call: list[tuple[str, str]] = [("name", _TEXT_EQ), ("op", "(")]
            call += tokens[left:i] + [("op", ",")] + tokens[i + 1 : right_end]
            call.append(("op", ")"))
            if text == "!=":
                call = [("op", "!"), *call]
            tokens[left:right_end] = call
            changed = rewritten = True
            break
    return " ".join(t[1] for t in tokens) if rewritten else source


Activation = Mapping[str, Any]


class Expression:
    """A compiled CEL expression.

    ``functions`` are the expression functions of the installed plugins; they
    are only attached to an evaluation when the expression calls one.

    """

    __slots__ = ("_functions", "_path", "_program", "source")

    def __init__(
        self,
        source: str,
        functions: Mapping[str, Callable[..., Any]] | None = None,
        *,
        names: Sequence[str] = ("input", "output", "context"),
    ) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ExpressionError("an expression must be a non-empty string")
        self.source = source
        try:
            self._program = cel.compile(source)
        except ValueError as exc:
            raise ExpressionError(_compile_message(source, exc)) from exc
        compiled_source = rewrite_text_equality(source)
        if compiled_source != source:
            self._program = cel.compile(compiled_source)
        used = set(self._program.functions())
        available = {**_STDLIB, **(functions or {}), _TEXT_EQ: _text_eq}
        self._functions = {k: v for k, v in available.items() if k in used}
        unknown = self._unknown_names(used)
        if unknown:
            raise ExpressionError(f"unknown function {unknown[0]!r} in {source!r}")
        unknown_names = set(self._program.variables()) - set(names)
        unknown_names -= self._bound_names(compiled_source)
        if unknown_names:
            allowed = " or ".join(
                [", ".join(names[:-1]), names[-1]] if len(names) > 1 else names
            )
            raise ExpressionError(
                f"unknown name {sorted(unknown_names)[0]!r} in {source!r}; "
                f"use {allowed}"
            )
        self._path = _path_of(source)
        """The keys of a plain path such as ``input.order.id``, else None."""

    def _unknown_names(self, used: set[str]) -> list[str]:
        known = set(self._functions)
        return sorted(
            name
            for name in used
            if _IDENTIFIER.fullmatch(name)
            and name not in known
            and name not in _CEL_BUILTINS
            and "@" not in name
        )

    @staticmethod
    def _bound_names(source: str) -> set[str]:
        # Comprehension variables: ``list.exists(x, x > 1)`` binds ``x``.
        return set(
            re.findall(
                r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,",
                source,
            )
        )

    @property
    def uses_functions(self) -> bool:
        return bool(self._functions)

    def context(self, variables: Mapping[str, Any]) -> cel.Context:
        """A reusable evaluation context, converted once."""
        return cel.Context(dict(variables), self._functions or None)

    def evaluate(self, variables: Mapping[str, Any] | cel.Context) -> Any:
        """Evaluate; raise :class:`ExpressionError` when evaluation fails.

        A plain path (``input.order.id``, ``output["x"]``) is looked up in
        Python when every step is a dict, and its value returned as CEL
        would return it (a decimal as a float, a tuple as a list): the same
        result without converting all of ``variables`` to CEL first, which
        costs tens of microseconds for an event of a dozen fields. Anything
        else, a missing key included, goes to CEL, which says what failed.

        """
        path = self._path
        if path is not None and not isinstance(variables, cel.Context):
            value: Any = variables
            for key in path:
                if type(value) is not dict or key not in value:
                    break
                value = value[key]
            else:
                try:
                    return _as_cel(value)
                except _NotCel:
                    pass  # CEL says which value it cannot take
        try:
            if isinstance(variables, cel.Context):
                return self._program.execute(variables)
            if self._functions:
                return self._program.execute(
                    cel.Context(dict(variables), self._functions)
                )
            return self._program.execute(dict(variables))
        except Exception as exc:  # the CEL binding raises assorted types
            raise ExpressionError(_runtime_message(self.source, exc)) from exc

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


# Functions the CEL binding evaluates natively.
_CEL_BUILTINS = {
    "size",
    "has",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "type",
    "duration",
    "timestamp",
    "matches",
    "contains",
    "startsWith",
    "endsWith",
    "exists",
    "exists_one",
    "all",
    "map",
    "filter",
    "dyn",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getFullYear",
    "getHours",
    "getMilliseconds",
    "getMinutes",
    "getMonth",
    "getSeconds",
    "optional",
    "orValue",
    "hasValue",
    "value",
    "or",
    "in",
    "of",
    "none",
}

# The binding's extended standard library (split, lowerAscii, join, min,
# max, ...), attached to an evaluation only when the expression calls one.
# Its namespaced functions (math.greatest) are left out, as the compiler
# reports them under their last part; so are its list functions, whose
# "contains" would shadow the native string method.
_STDLIB: dict[str, Callable[..., Any]] = {
    name: function
    for library in ("core", "strings")
    for name, function in cel_stdlib.EXTENSIONS[library].items()
    if "." not in name
}


def _compile_message(source: str, exc: Exception) -> str:
    text = str(exc)
    match = re.search(r"ERROR: <input>:(\d+):(\d+): (.*?)(?:\n|$)", text)
    if match:
        return f"cannot compile {source!r}: {match.group(3)} at column {match.group(2)}"
    return f"cannot compile {source!r}: {text}"


_PATH_STEP = re.compile(
    r"""\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*(?:'([^'\\]*)'|"([^"\\]*)")\s*\])"""
)


def _path_of(source: str) -> tuple[str, ...] | None:
    """``("input", "order", "id")`` for ``input.order.id``; None if not a path.

    Only the three roots, names after a dot and quoted keys without
    escapes in brackets; a CEL keyword after a dot is not a path step.
    """
    text = source.strip()
    root = re.match(r"(input|output|context)\b", text)
    if root is None:
        return None
    keys = [root.group(1)]
    position = root.end()
    while position < len(text):
        step = _PATH_STEP.match(text, position)
        if step is None:
            return None
        name, single, double = step.groups()
        key = name if name is not None else single if single is not None else double
        if name is not None and name in _CEL_RESERVED:
            return None
        keys.append(key)
        position = step.end()
    return tuple(keys)


# Words CEL reserves, which are no field name after a dot.
_CEL_RESERVED = {
    "true", "false", "null", "in", "as", "break", "const", "continue", "else",
    "for", "function", "if", "import", "let", "loop", "package", "namespace",
    "return", "var", "void", "while",
}  # fmt: skip


class _NotCel(Exception):
    """A value whose CEL form is left to CEL to work out."""


_CEL_INT = range(-(2**63), 2**64)  # int64 and uint64


def _as_cel(value: Any) -> Any:
    """``value`` as the CEL binding hands it back: a copy, in its types.

    Only for the types events are made of; any other (a naive datetime,
    a date, an int beyond 64 bits, a map with keys that are not text)
    raises _NotCel, and the caller asks CEL itself.
    """
    kind = type(value)
    if kind is str or kind is bool or kind is float or value is None:
        return value
    if kind is int:
        if value in _CEL_INT:
            return value
    elif kind is dict:
        if all(type(key) is str for key in value):
            return {key: _as_cel(item) for key, item in value.items()}
    elif kind is list or kind is tuple:
        return [_as_cel(item) for item in value]
    elif kind is Decimal:
        return float(value)
    elif kind is datetime.datetime:
        if value.tzinfo is not None:
            return value
    elif kind is bytes or kind is datetime.timedelta:
        return value
    raise _NotCel(kind.__name__)


def _runtime_message(source: str, exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"{source!r}: no such key {exc.args[0]!r}"
    return f"{source!r}: {exc}"


@dataclass(frozen=True)
class IndexedEquality:
    """A filter of the form ``input.X == context.params.Y``.

    ``event_root`` is ``"input"`` or ``"output"``, ``event_path`` the keys
    below it, ``context_path`` the keys below ``context``. The fan-out hub
    looks such filters up in an index instead of evaluating them per
    subscriber; the comparison is by text, as for any equality with a
    ``context`` path. A literal in place of the event side
    (``context.params.kind == 'vip'``) is indexed too: ``event_root`` is
    then ``"literal"`` and ``event_path`` holds its text.

    """

    event_root: str
    event_path: tuple[str, ...]
    context_path: tuple[str, ...]

    _PATH = r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
    _EVENT = re.compile(r"^(input|output)\." + _PATH + r"$")
    _CONTEXT = re.compile(r"^context\." + _PATH + r"$")
    _LITERAL = re.compile(r"""^(?:'([^'\\]*)'|"([^"\\]*)"|(-?\d+))$""")

    @classmethod
    def detect(cls, source: str) -> IndexedEquality | None:
        parts = source.split("==")
        if len(parts) != 2 or any(op in source for op in ("!=", "&&", "||")):
            return None
        left, right = (p.strip() for p in parts)
        for event_side, context_side in ((left, right), (right, left)):
            event = cls._EVENT.match(event_side)
            context = cls._CONTEXT.match(context_side)
            if not context or "." not in context.group(1):
                continue
            context_path = tuple(context.group(1).split("."))
            if event:
                return cls(
                    event.group(1), tuple(event.group(2).split(".")), context_path
                )
            literal = cls._LITERAL.match(event_side)
            if literal:
                text = next(g for g in literal.groups() if g is not None)
                return cls("literal", (text,), context_path)
        return None

    def event_value(self, input: Any, output: Any) -> str | None:
        """The text to look up for one event, or None when it has none."""
        if self.event_root == "literal":
            return self.event_path[0]
        value = input if self.event_root == "input" else output
        for key in self.event_path:
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        return as_text(value)

    def context_value(self, context: Mapping[str, Any]) -> str | None:
        """The text a subscriber is indexed under, or None when it has none."""
        value: Any = context
        for key in self.context_path:
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        return as_text(value)


class Template:
    """A string with ``${EXPR}`` parts, evaluated per event.

    A template without ``${`` is a constant and costs nothing to render.
    ``$${`` is a literal ``${``.

    """

    __slots__ = ("_parts", "constant", "source")

    def __init__(
        self, source: str, functions: Mapping[str, Callable[..., Any]] | None = None
    ) -> None:
        self.source = source
        self._parts: list[str | Expression] = []
        pos = 0
        literal = []
        while pos < len(source):
            if source.startswith("$${", pos):
                literal.append("${")
                pos += 3
            elif source.startswith("${", pos):
                end = _closing_brace(source, pos + 2)
                if end is None:
                    raise ExpressionError(f"unclosed '${{' in template {source!r}")
                if literal:
                    self._parts.append("".join(literal))
                    literal = []
                inner = source[pos + 2 : end]
                self._parts.append(Expression(inner, functions))
                pos = end + 1
            else:
                literal.append(source[pos])
                pos += 1
        if literal:
            self._parts.append("".join(literal))
        self.constant: str | None = None
        if all(isinstance(p, str) for p in self._parts):
            self.constant = "".join(p for p in self._parts if isinstance(p, str))

    def render(self, variables: Mapping[str, Any] | cel.Context) -> str:
        if self.constant is not None:
            return self.constant
        pieces: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                pieces.append(part)
                continue
            value = part.evaluate(variables)
            text = as_text(value)
            if text is None:
                raise ExpressionError(
                    f"template {self.source!r}: ${{{part.source}}} gave "
                    f"{value!r}, which is not text"
                )
            pieces.append(text)
        return "".join(pieces)

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


def _closing_brace(source: str, start: int) -> int | None:
    depth = 0
    quote = ""
    i = start
    while i < len(source):
        char = source[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return None
