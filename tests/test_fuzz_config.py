"""Property-based tests of the configuration loader and the expressions.

Whatever the text, loading either succeeds or raises ``ConfigError`` whose
every problem names the file and line; never another exception. Expressions
and templates either compile or raise ``ExpressionError``; a compiled one,
evaluated on any JSON input, returns or raises ``ExpressionError`` (a
filter that fails counts as false), never anything else.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mycel import ConfigError, Expression, ExpressionError, MycelError, Template
from mycel._config import load_config_text
from mycel.testing import registry

REGISTRY = registry()
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

TYPES = ("websocket", "sse", "graphql", "rabbitmq", "cdc", "database", "elasticsearch")
SETTINGS = (
    "port", "host", "path", "url", "exchange", "queue_prefix", "tables", "driver",
    "send_queue", "ping_interval", "history_size", "heartbeat_interval",
    "connection_string", "endpoint", "prefetch", "max_message_size", "batch_size",
    "subscriptions", "cors", "nonsense", "type",
)  # fmt: skip


def hcl_value() -> st.SearchStrategy[str]:
    """HCL literals, some well-formed and some not."""
    scalar = (
        st.integers(-(2**40), 2**40).map(str)
        | st.text(max_size=30).map(json.dumps)
        | st.sampled_from(["true", "false", "null", '"30s"', '"-1ms"', '"5 m"'])
        | st.text(max_size=10)  # raw, usually broken, text
    )
    return st.recursive(
        scalar,
        lambda c: (
            st.lists(c, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
            | st.dictionaries(
                st.from_regex(r"[a-z_]{1,8}", fullmatch=True), c, max_size=3
            ).map(lambda d: "{ " + " ".join(f"{k} = {v}" for k, v in d.items()) + " }")
        ),
        max_leaves=6,
    )


def check_load(text: str) -> None:
    try:
        load_config_text(text, REGISTRY, {}, file="fuzz.mycel")
    except ConfigError as exc:
        assert exc.problems, "a ConfigError without problems"
        for problem in exc.problems:
            assert problem.message
            if problem.file:
                assert problem.file == "fuzz.mycel"
                assert problem.line >= 0
        assert str(exc).startswith("the configuration has ")


@FAST
@given(st.text(max_size=300))
def test_any_text_loads_or_is_a_config_error(text: str) -> None:
    check_load(text)


@FAST
@given(
    st.sampled_from(TYPES),
    st.lists(st.tuples(st.sampled_from(SETTINGS), hcl_value()), max_size=5),
)
def test_connector_settings_of_any_shape(
    kind: str, pairs: list[tuple[str, str]]
) -> None:
    body = "\n".join(f"  {key} = {value}" for key, value in pairs)
    check_load(f'connector "c" {{\n  type = "{kind}"\n{body}\n}}\n')


FLOW = """
connector "ws" {{ type = "websocket" }}
connector "mem" {{ type = "memory" }}
flow "f" {{
  from {{ connector = "mem"  operation = {operation} }}
  transform {{ x = {transform} }}
  to {{
    connector = "ws"
    operation = {target}
    filter    = {filter}
  }}
}}
"""

expression_text = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.sampled_from([
            "input", "output", "context", ".", "x", "params", "user_id", "==", "!=",
            "&&", "||", "!", "(", ")", "[", "]", "{", "}", "1", "'a'", '"b"', "+",
            "size", "has", ",", ":", "?", "null", "true", "in", "${", "$${",
        ]),
        max_size=12,
    ).map(" ".join),
)  # fmt: skip


@FAST
@given(expression_text, expression_text, expression_text, expression_text)
def test_flow_expressions_and_templates_of_any_text(
    operation: str, transform: str, target: str, filter: str
) -> None:
    check_load(
        FLOW.format(
            operation=json.dumps(operation),
            transform=json.dumps(transform),
            target=json.dumps("room:" + target),
            filter=json.dumps(filter),
        )
    )


def evaluate(source: str, variables: dict[str, Any]) -> None:
    try:
        expression = Expression(source)
    except ExpressionError:
        return
    with contextlib.suppress(MycelError):
        expression.evaluate(variables)


@FAST
@given(expression_text, json_values, json_values, json_values)
def test_expressions_evaluate_or_fail_cleanly(
    source: str, input: Any, output: Any, params: Any
) -> None:
    evaluate(source, {"input": input, "output": output, "context": {"params": params}})


@FAST
@given(
    st.sampled_from([
        "input.user_id == context.params.user_id",
        "input.a.b[0] > 1",
        "size(input) > 0 && input.x != null",
        "has(input.x) ? input.x + 1 : 0",
        "input.s + 'x'",
        "input in [1, 2]",
        "input.user_id == context.connection_params.userId",
    ]),
    json_values,
    json_values,
)  # fmt: skip
def test_spec_filters_on_any_input(source: str, input: Any, params: Any) -> None:
    evaluate(source, {"input": input, "output": input, "context": {"params": params}})


@FAST
@given(expression_text, json_values)
def test_templates_render_text_or_fail_cleanly(source: str, input: Any) -> None:
    try:
        template = Template("room:" + source)
    except ExpressionError:
        return
    try:
        rendered = template.render({"input": input, "output": input, "context": {}})
    except MycelError:
        return
    assert isinstance(rendered, str)
    assert rendered.startswith("room:")


BROKEN_TWICE = """connector "ws" {
  type = "websocket"
  port = "abc"
}
connector "m" { type = "memory" }
flow "f" {
  from { connector = "m"  operation = "x" }
  to   { connector = "ws" operation = "room:${input." }
}
"""


def test_a_bad_setting_does_not_hide_a_bad_template(tmp_path: Path) -> None:
    (tmp_path / "main.mycel").write_text(BROKEN_TWICE)
    result = subprocess.run(
        [sys.executable, "-m", "mycel", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "main.mycel:3: connector 'ws': setting 'port'" in output
    assert "main.mycel:8: flow 'f' operation: unclosed '${' in template" in output
