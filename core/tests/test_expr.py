"""CEL expressions, text equality and ``${...}`` templates."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mycel import Expression, ExpressionError, Template, as_text
from mycel._expr import IndexedEquality, rewrite_text_equality


@pytest.mark.parametrize(
    ("event_value", "expected"),
    [(123, True), ("123", True), (123.0, True), (124, False), ("0123", False)],
)
def test_params_compare_by_text(event_value: object, expected: bool) -> None:
    expression = Expression("input.user_id == context.params.user_id")
    variables = {
        "input": {"user_id": event_value},
        "context": {"params": {"user_id": "123"}},
    }
    assert expression.evaluate(variables) is expected


def test_not_equal_also_compares_by_text() -> None:
    expression = Expression("context.params.user_id != input.user_id")
    variables = {"input": {"user_id": 5}, "context": {"params": {"user_id": "5"}}}
    assert expression.evaluate(variables) is False


def test_text_equality_inside_a_larger_expression() -> None:
    expression = Expression(
        "input.user_id == context.params.user_id && input.kind == 'order'"
    )
    variables = {
        "input": {"user_id": 9, "kind": "order"},
        "context": {"params": {"user_id": "9"}},
    }
    assert expression.evaluate(variables) is True


def test_equality_without_context_keeps_cel_typing() -> None:
    assert rewrite_text_equality("input.a == 1") == "input.a == 1"
    assert Expression("input.a == 1").evaluate({"input": {"a": "1"}}) is False


def test_rewrite_leaves_calls_alone() -> None:
    source = "size(input.items) == context.params.n"
    assert rewrite_text_equality(source) == source


def test_missing_field_raises_expression_error() -> None:
    expression = Expression("input.user_id == context.params.user_id")
    with pytest.raises(ExpressionError) as info:
        expression.evaluate({"input": {}, "context": {"params": {"user_id": "1"}}})
    assert str(info.value) == (
        "'input.user_id == context.params.user_id': no such key 'user_id'"
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "an expression must be a non-empty string"),
        (
            "input.",
            "cannot compile 'input.': Syntax error: no viable alternative at input '.' at column 7",
        ),
        ("now()", "unknown function 'now' in 'now()'"),
        (
            "request.id",
            "unknown name 'request' in 'request.id'; use input, output or context",
        ),
    ],
)
def test_compile_errors(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        Expression(source)
    assert str(info.value) == message


def test_plugin_functions_are_callable() -> None:
    expression = Expression("shout(input.name)", {"shout": lambda s: s.upper() + "!"})
    assert expression.evaluate({"input": {"name": "hi"}}) == "HI!"


def test_macros_bind_their_variables() -> None:
    expression = Expression("input.items.exists(i, i > 2)")
    assert expression.evaluate({"input": {"items": [1, 3]}}) is True


def test_template_renders_parts_as_text() -> None:
    template = Template("room:${input.channel_id}-${input.flag}")
    assert template.constant is None
    assert (
        template.render({"input": {"channel_id": 42, "flag": True}}) == "room:42-true"
    )


def test_constant_template() -> None:
    template = Template("broadcast")
    assert template.constant == "broadcast"
    assert template.render({}) == "broadcast"


def test_escaped_template_is_literal() -> None:
    assert Template("cost: $${input.x}").render({}) == "cost: ${input.x}"


def test_template_with_braces_and_quotes_inside() -> None:
    template = Template("k:${{'a': input.x}['a'] + '}'}")
    assert template.render({"input": {"x": "v"}}) == "k:v}"


def test_template_part_that_is_not_text() -> None:
    with pytest.raises(ExpressionError) as info:
        Template("room:${input.ids}").render({"input": {"ids": [1, 2]}})
    assert str(info.value) == (
        "template 'room:${input.ids}': ${input.ids} gave [1, 2], which is not text"
    )


def test_unclosed_template() -> None:
    with pytest.raises(ExpressionError, match=r"unclosed '\$\{' in template 'a\$\{b'"):
        Template("a${b")


@pytest.mark.parametrize(
    ("source", "found"),
    [
        (
            "input.user_id == context.params.user_id",
            ("input", ("user_id",), ("params", "user_id")),
        ),
        (
            "context.connection_params.userId == input.user_id",
            ("input", ("user_id",), ("connection_params", "userId")),
        ),
        (
            "output.owner.id == context.user.sub",
            ("output", ("owner", "id"), ("user", "sub")),
        ),
        ("context.params.kind == 'vip'", ("literal", ("vip",), ("params", "kind"))),
        ("7 == context.user.level", ("literal", ("7",), ("user", "level"))),
        ("input.a == context.params.a && input.b == 1", None),
        ("input.a == 1", None),
        ("input.a != context.params.a", None),
        ("input.a == context.x", None),
    ],
)
def test_indexable_filters_are_detected(
    source: str, found: tuple[object, ...] | None
) -> None:
    detected = IndexedEquality.detect(source)
    if found is None:
        assert detected is None
    else:
        assert detected is not None
        assert (
            detected.event_root,
            detected.event_path,
            detected.context_path,
        ) == found


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("x", "x"),
        (True, "true"),
        (False, "false"),
        (7, "7"),
        (7.0, "7"),
        (7.5, "7.5"),
        (Decimal("7.00"), "7"),
        (Decimal("7.50"), "7.5"),
        (None, None),
        ([1], None),
        ({"a": 1}, None),
    ],
)
def test_as_text(value: object, text: str | None) -> None:
    assert as_text(value) == text


def test_string_functions_of_the_extended_library() -> None:
    expression = Expression("input.room.split(':')[0].upperAscii() == 'ACME'")
    assert expression.evaluate({"input": {"room": "acme:general"}}) is True


def test_namespaced_library_functions_are_refused_at_load() -> None:
    with pytest.raises(ExpressionError) as info:
        Expression("math.greatest([1, 2])")
    assert str(info.value) == "unknown function 'greatest' in 'math.greatest([1, 2])'"


# Plain paths are looked up in Python; CEL must not be able to tell.

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
    st.binary(max_size=3),
    st.datetimes(timezones=st.sampled_from([None, dt.UTC])),
    st.dates(),
    st.timedeltas(),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.sampled_from(["a", "b", "x y"]), inner, max_size=3),
        st.dictionaries(st.integers(0, 3), inner, max_size=2),
    ),
    max_leaves=8,
)
_SOURCES = ["input.a", "input.a.b", "input['x y']", 'output["a"].b', "context.a.a"]


def _through_cel(source: str, variables: dict[str, object]) -> tuple[str, object]:
    slow = Expression(source)
    slow._path = None  # as every expression was evaluated before
    try:
        return "value", slow.evaluate(variables)
    except ExpressionError as exc:
        return "error", str(exc)


def _reached(path: tuple[str, ...], variables: dict[str, object]) -> object:
    """``variables`` with only what ``path`` reaches: all CEL has to convert."""
    reached = _dig(variables, path)
    for key in reversed(path):
        reached = {key: reached}
    return reached


def _dig(variables: dict[str, object], path: tuple[str, ...]) -> object:
    value: object = variables
    for key in path:
        assert isinstance(value, dict)
        value = value[key]
    return value


def _same(got: tuple[str, object], expected: tuple[str, object]) -> bool:
    # NaN never equals itself: compare floats by their text.
    if got[0] == expected[0] == "value" and isinstance(expected[1], float):
        return repr(got[1]) == repr(expected[1])
    return got == expected


@settings(max_examples=400, deadline=None)
@given(
    source=st.sampled_from(_SOURCES),
    input=st.dictionaries(st.sampled_from(["a", "b", "x y"]), _VALUES, max_size=3),
    output=st.dictionaries(st.sampled_from(["a"]), _VALUES, max_size=1),
    context=_VALUES,
)
def test_a_plain_path_evaluates_as_cel_does(
    source: str, input: dict[str, object], output: dict[str, object], context: object
) -> None:
    variables = {"input": input, "output": output, "context": context}
    before = _through_cel(source, variables)
    try:
        now: tuple[str, object] = "value", Expression(source).evaluate(variables)
    except ExpressionError as exc:
        now = "error", str(exc)
    if before[0] == "value" or now[0] == "error":
        assert _same(now, before)
    else:
        # CEL failed on a value the path does not reach; given only what it
        # reaches, CEL gives what the lookup gave.
        path = Expression(source)._path
        assert path is not None
        pruned = _reached(path, variables)
        assert isinstance(pruned, dict)
        assert _same(now, _through_cel(source, pruned))


def test_a_plain_path_still_works_when_other_fields_are_not_cel_values() -> None:
    # CEL cannot take a date anywhere in the variables; a path that does not
    # reach it no longer needs to convert it.
    variables = {"input": {"id": 7, "day": dt.date(2026, 12, 4)}}
    assert Expression("input.id").evaluate(variables) == 7
    with pytest.raises(ExpressionError):
        Expression("input.day").evaluate(variables)
    with pytest.raises(ExpressionError):
        Expression("input.id + 1").evaluate(variables)


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ("input.id", ("input", "id")),
        (" input . order [ 'id' ] ", ("input", "order", "id")),
        ('context.params["user-id"]', ("context", "params", "user-id")),
        ("output", ("output",)),
        ("input.id + 1", None),
        ("input.items[0]", None),
        ("size(input)", None),
        ("input.a == 'x'", None),
        ("input.a.size()", None),
        ("input['a\\'b']", None),
    ],
)
def test_which_expressions_are_plain_paths(
    source: str, path: tuple[str, ...] | None
) -> None:
    assert Expression(source)._path == path
