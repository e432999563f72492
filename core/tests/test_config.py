"""Loading configurations: what works, and every way one can be broken."""

from __future__ import annotations

from pathlib import Path

import pytest

from mycel import ConfigError, _builtin, load_config, load_config_text
from mycel.testing import registry

# Core's own plugin, registered directly: these tests want exactly the
# built-in types, whatever else is installed.
REGISTRY = registry([_builtin], entry_points=False)


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, REGISTRY, environ or {}, file="app.mycel")
    return [str(p) for p in info.value.problems]


GOOD = """
service {
  name       = "shop"
  admin_port = 9090
  shutdown_timeout = "5s"
}
connector "bus" { type = "memory" }
connector "api" {
  type = "http"
  port = 0
}
flow "accept" {
  from { connector = "api"  operation = "POST /orders" }
  transform {
    id    = "input.order_id"
    label = "'order-' + string(output.id)"
  }
  to { connector = "bus"  target = "orders.${input.region}" }
  retry {
    attempts  = 5
    delay     = "50ms"
    max_delay = "1s"
  }
}
"""


def test_good_configuration_loads_with_its_values() -> None:
    config = load_config_text(GOOD, REGISTRY, {}, file="app.mycel")
    assert config.service.name == "shop"
    assert config.service.admin_port == 9090
    assert config.service.shutdown_timeout == 5.0
    assert sorted(config.connectors) == ["api", "bus"]
    flow = config.flows["accept"]
    assert [name for name, _ in flow.transform] == ["id", "label"]
    assert flow.to[0].target is not None
    assert flow.to[0].target.source == "orders.${input.region}"
    assert (flow.retry.attempts, flow.retry.delay, flow.retry.max_delay) == (
        5,
        0.05,
        1.0,
    )


def test_env_with_and_without_default() -> None:
    text = """
    connector "api" {
      type = "http"
      host = env("API_HOST")
      static_dir = env("STATIC", "public")
    }
    """
    config = load_config_text(text, REGISTRY, {"API_HOST": "0.0.0.0"})
    settings = config.connectors["api"].settings
    assert settings.model_dump()["host"] == "0.0.0.0"
    assert settings.model_dump()["static_dir"] == "public"


def test_directory_merges_every_mycel_and_hcl_file(tmp_path: Path) -> None:
    (tmp_path / "connectors.hcl").write_text('connector "bus" { type = "memory" }\n')
    nested = tmp_path / "flows"
    nested.mkdir()
    (nested / "relay.mycel").write_text(
        'flow "relay" {\n'
        '  from { connector = "bus" operation = "a.#" }\n'
        '  to { connector = "bus" target = "b" }\n'
        "}\n"
    )
    (tmp_path / "notes.txt").write_text("not configuration")
    config = load_config(tmp_path, REGISTRY, {})
    assert list(config.flows) == ["relay"]
    assert config.base_dir == tmp_path.resolve()


def test_problems_in_several_files_are_reported_together(tmp_path: Path) -> None:
    (tmp_path / "a.mycel").write_text('connector "bus" {\n  type = "memroy"\n}\n')
    (tmp_path / "b.mycel").write_text('flow "f" {\n  from { connector = "x" }\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, REGISTRY, {})
    assert [str(p) for p in info.value.problems] == [
        f"{tmp_path}/a.mycel:2: connector 'bus': unknown connector type 'memroy'. "
        "Did you mean 'memory'? Installed types: http, memory.",
        f"{tmp_path}/b.mycel:1: flow 'f' has no to block. Add at least one.",
        f"{tmp_path}/b.mycel:2: flow 'f': no connector named 'x'. "
        "Defined connectors: none.",
    ]


def test_error_message_counts_and_lists_problems() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(
            'connector "a" { type = "x" }\nconnector "b" { type = "y" }\n',
            REGISTRY,
            {},
            file="app.mycel",
        )
    assert str(info.value).splitlines()[0] == "the configuration has 2 problems:"


def test_missing_directory_is_one_clear_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope", REGISTRY, {})
    assert [str(p) for p in info.value.problems] == [
        f"no such directory: '{tmp_path / 'nope'}'. "
        "Give the directory that holds your .mycel files."
    ]


def test_empty_directory_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, REGISTRY, {})
    assert [str(p) for p in info.value.problems] == [
        "no *.mycel or *.hcl files with blocks were found. "
        "Point mycel at the directory that holds your configuration."
    ]


FLOW = """
connector "bus" { type = "memory" }
connector "api" {
  type = "http"
  port = 0
}
"""

# (name, configuration, exact problems). Line numbers count from the first
# line of the configuration text.
BROKEN = [
    (
        "syntax error",
        'connector "bus" {\n  type = "memory"\n',
        [
            "app.mycel:3: syntax error at column 1. Check for a missing quote, brace or '='."
        ],
    ),
    (
        "unknown setting with suggestion",
        'connector "bus" {\n  type = "memory"\n  bufer = 10\n}\n',
        [
            "app.mycel:3: connector 'bus': unknown setting 'bufer'. Did you mean 'buffer'?"
        ],
    ),
    (
        "unknown setting without a close name",
        'connector "bus" {\n  type = "memory"\n  colour = 1\n}\n',
        [
            "app.mycel:3: connector 'bus': unknown setting 'colour'. "
            "Known settings: buffer, dead_letter_size."
        ],
    ),
    (
        "wrong type",
        'connector "bus" {\n  type = "memory"\n  buffer = "lots"\n}\n',
        [
            "app.mycel:3: connector 'bus': setting 'buffer' = 'lots': Input should "
            "be a valid integer, unable to parse string as an integer."
        ],
    ),
    (
        "value out of range",
        'connector "bus" {\n  type = "memory"\n  buffer = 0\n}\n',
        [
            "app.mycel:3: connector 'bus': setting 'buffer' = 0: Input should be "
            "greater than or equal to 1."
        ],
    ),
    (
        "duplicate attribute",
        'connector "api" {\n  type = "http"\n  port = 1\n  port = 2\n}\n',
        [
            "app.mycel:4: duplicate attribute 'port' (first set on line 3). Keep one of them."
        ],
    ),
    (
        "duplicate connector name",
        'connector "bus" { type = "memory" }\nconnector "bus" { type = "memory" }\n',
        [
            "app.mycel:2: duplicate connector name 'bus' (first defined at "
            "app.mycel:1). Rename one of them."
        ],
    ),
    (
        "unknown type provided by a known distribution",
        'connector "ws" { type = "websocket" }\n',
        [
            "app.mycel:1: connector 'ws': unknown connector type 'websocket'. "
            "It is provided by mycel-ws: pip install mycel-ws."
        ],
    ),
    (
        "unknown type, nothing close",
        'connector "q" { type = "kafka" }\n',
        [
            "app.mycel:1: connector 'q': unknown connector type 'kafka'. "
            "Installed types: http, memory."
        ],
    ),
    (
        "connector without type",
        'connector "q" {\n  port = 1\n}\n',
        [
            "app.mycel:1: connector 'q' has no type. "
            'Add type = "..." (for example type = "memory").'
        ],
    ),
    (
        "connector without a name",
        'connector { type = "memory" }\n',
        [
            'app.mycel:1: connector block needs exactly one name. Write connector "name" { ... }.'
        ],
    ),
    (
        "unknown top-level block",
        'conector "bus" { type = "memory" }\n',
        ["app.mycel:1: unknown block type 'conector'. Did you mean 'connector'?"],
    ),
    (
        "flow naming a missing connector",
        FLOW + 'flow "f" {\n  from { connector = "buss" operation = "a" }\n'
        '  to { connector = "bus" target = "b" }\n}\n',
        ["app.mycel:8: flow 'f': no connector named 'buss'. Did you mean 'bus'?"],
    ),
    (
        "unsupported source operation",
        FLOW + 'flow "f" {\n  from { connector = "api" operation = "GET /orders" }\n'
        '  to { connector = "bus" target = "b" }\n}\n',
        [
            "app.mycel:8: flow 'f': connector 'api' (http) has no source operation "
            "'GET /orders'. It offers: METHOD /PATH."
        ],
    ),
    (
        "connector that cannot be a target",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "api" }\n}\n',
        ["app.mycel:9: flow 'f': connector 'api' (http) cannot be a target."],
    ),
    (
        "unsupported target operation",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "bus" operation = "broadcast" target = "b" }\n}\n',
        [
            "app.mycel:9: flow 'f': connector 'bus' (memory) has no target "
            "operation 'broadcast'. It offers: publish."
        ],
    ),
    (
        "missing target",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "bus" }\n}\n',
        [
            "app.mycel:9: flow 'f': to block for connector 'bus' (memory) needs a "
            'target. Add target = "..."'
        ],
    ),
    (
        "filter that does not compile",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to {\n    connector = "bus"\n    target = "b"\n'
        '    filter = "input.user_id =="\n  }\n}\n',
        [
            "app.mycel:12: flow 'f' filter: cannot compile 'input.user_id ==': "
            "Syntax error: mismatched input '<EOF>' expecting {'[', '{', '(', '.', "
            "'-', '!', 'true', 'false', 'null', NUM_FLOAT, NUM_INT, NUM_UINT, "
            "STRING, BYTES, IDENTIFIER} at column 17."
        ],
    ),
    (
        "filter with an unknown name",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to {\n    connector = "bus"\n    target = "b"\n'
        '    filter = "event.user_id == 1"\n  }\n}\n',
        [
            "app.mycel:12: flow 'f' filter: unknown name 'event' in "
            "'event.user_id == 1'; use input, output or context."
        ],
    ),
    (
        "transform with an unknown function",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  transform {\n    id = "uuid4()"\n  }\n'
        '  to { connector = "bus" target = "b" }\n}\n',
        [
            "app.mycel:10: flow 'f' transform 'id': unknown function 'uuid4' in 'uuid4()'."
        ],
    ),
    (
        "template that does not compile",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "bus" target = "room:${input.}" }\n}\n',
        [
            "app.mycel:9: flow 'f' target: cannot compile 'input.': Syntax error: "
            "no viable alternative at input '.' at column 7."
        ],
    ),
    (
        "template never closed",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "bus" target = "room:${input.id" }\n}\n',
        ["app.mycel:9: flow 'f' target: unclosed '${' in template 'room:${input.id'."],
    ),
    (
        "flow without from",
        FLOW + 'flow "f" {\n  to { connector = "bus" target = "b" }\n}\n',
        ["app.mycel:7: flow 'f' needs exactly one from block, not 0."],
    ),
    (
        "flow with two from blocks",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  from { connector = "bus" operation = "b" }\n'
        '  to { connector = "bus" target = "b" }\n}\n',
        ["app.mycel:9: flow 'f' needs exactly one from block, not 2."],
    ),
    (
        "flow without to",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n}\n',
        ["app.mycel:7: flow 'f' has no to block. Add at least one."],
    ),
    (
        "unknown attribute in to",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "bus" target = "b" fitler = "true" }\n}\n',
        [
            "app.mycel:9: flow 'f': unknown attribute 'fitler' in to block. "
            "Did you mean 'filter'?"
        ],
    ),
    (
        "unknown block in flow",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "bus" target = "b" }\n  retries { attempts = 2 }\n}\n',
        ["app.mycel:10: flow 'f': unknown block 'retries'. Did you mean 'retry'?"],
    ),
    (
        "bad retry",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "bus" target = "b" }\n  retry {\n    delay = "soon"\n  }\n}\n',
        [
            "app.mycel:11: flow 'f' retry: setting 'delay' = 'soon': 'soon' is not "
            'a duration; write it like "500ms", "30s", "5m" or "1h".'
        ],
    ),
    (
        "duplicate flow name",
        FLOW + 'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "bus" target = "b" }\n}\n'
        'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "bus" target = "b" }\n}\n',
        [
            "app.mycel:11: duplicate flow name 'f' (first defined at app.mycel:7). "
            "Rename one of them."
        ],
    ),
    (
        "missing environment variable",
        'connector "api" {\n  type = "http"\n  host = env("API_HOST")\n}\n',
        [
            "app.mycel:3: environment variable 'API_HOST' is not set and has no "
            "default; set it, or write env('API_HOST', \"default\")."
        ],
    ),
    (
        "unknown function in configuration",
        'connector "api" {\n  type = "http"\n  host = file("x")\n}\n',
        ["app.mycel:3: unknown function 'file'; only env() is available."],
    ),
    (
        "bare word value",
        'connector "bus" {\n  type = memory\n}\n',
        ["app.mycel:2: bare word 'memory' is not a value; quote it: \"memory\"."],
    ),
    (
        "two service blocks",
        'service { name = "a" }\nservice { name = "b" }\n',
        [
            "app.mycel:2: second service block (the first is at app.mycel:1). "
            "Merge them into one."
        ],
    ),
    (
        "service with a bad port",
        "service {\n  admin_port = 70000\n}\n",
        [
            "app.mycel:2: service: setting 'admin_port' = 70000: Input should be "
            "less than or equal to 65535."
        ],
    ),
    (
        "attribute outside any block",
        'name = "x"\nconnector "bus" { type = "memory" }\n',
        ["app.mycel:1: attribute 'name' outside any block."],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in BROKEN], ids=[n for n, _, _ in BROKEN]
)
def test_broken_configuration_is_reported_exactly(
    text: str, expected: list[str]
) -> None:
    assert problems(text) == expected


def test_there_are_at_least_25_broken_configurations() -> None:
    assert len(BROKEN) >= 25


def test_all_problems_are_reported_at_once() -> None:
    text = "".join(
        t for name, t, _ in BROKEN if "flow" not in name and "syntax" not in name
    )
    assert len(problems(text)) >= 10


def test_secret_values_are_not_shown_in_problems() -> None:
    from pydantic import SecretStr

    from mycel import Connector, Settings, hookimpl

    class VaultSettings(Settings):
        url: str
        password: SecretStr
        retries: int = 1

    class Vault(Connector):
        type_name = "vault"
        settings_model = VaultSettings

    class Plugin:
        @hookimpl
        def mycel_connector_types(self) -> list[type[Connector]]:
            return [Vault]

    reg = registry([_builtin, Plugin()], entry_points=False)
    text = (
        'connector "v" {\n  type = "vault"\n  url = 5\n  password = 12345\n'
        '  retries = "amqp://u:hunter2@host/"\n}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(text, reg, {}, file="app.mycel")
    shown = str(info.value)
    assert "12345" not in shown
    assert "hunter2" not in shown
    assert [str(p) for p in info.value.problems] == [
        "app.mycel:3: connector 'v': setting 'url' = 5: Input should be a valid string.",
        "app.mycel:4: connector 'v': setting 'password' = '***': Input should be a "
        "valid string.",
        "app.mycel:5: connector 'v': setting 'retries' = 'amqp://u:***@host/': Input "
        "should be a valid integer, unable to parse string as an integer.",
    ]


def test_secrets_inside_a_nested_block_error_are_masked() -> None:
    from mycel._settings import shown_value

    assert shown_value("jwt", {"secret": "hunter2", "issuer": "x"}) == {
        "secret": "***",
        "issuer": "x",
    }
    assert shown_value("nodes", ["http://u:pw@h:9200"]) == ["http://u:***@h:9200"]


def test_flow_naming_a_broken_connector_is_not_told_it_is_missing() -> None:
    assert problems(
        'connector "bus" {\n  type = "memory"\n  buffer = "x"\n}\n'
        'connector "q" { type = "kafka" }\n'
        'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "q" target = "b" }\n}\n'
    ) == [
        "app.mycel:3: connector 'bus': setting 'buffer' = 'x': Input should be a "
        "valid integer, unable to parse string as an integer.",
        "app.mycel:5: connector 'q': unknown connector type 'kafka'. "
        "Installed types: http, memory.",
    ]


def test_only_text_is_masked_as_a_secret() -> None:
    from mycel._settings import shown_value

    assert shown_value("credentials", True) is True
    assert shown_value("api_key", "abc") == "***"


def test_whole_block_checks_and_target_checks_are_reported() -> None:
    from pydantic import model_validator

    from mycel import Connector, Operation, Settings, hookimpl

    class PairSettings(Settings):
        low: int = 0
        high: int = 1

        @model_validator(mode="after")
        def ordered(self) -> PairSettings:
            if self.low > self.high:
                raise ValueError("low must not exceed high")
            return self

    class Table(Connector):
        type_name = "table"
        settings_model = PairSettings
        target_operations = (Operation("insert", "insert a row"),)
        default_operation = "insert"
        target_required = True

        @classmethod
        def check_target(cls, settings: Settings, target: str) -> list[str]:
            if not target.replace("_", "").isalnum():
                return [f"{target!r} is not a table name"]
            return []

    class Plugin:
        @hookimpl
        def mycel_connector_types(self) -> list[type[Connector]]:
            return [Table]

    reg = registry([_builtin, Plugin()], entry_points=False)
    text = (
        'connector "t" {\n  type = "table"\n  low = 5\n}\n'
        'connector "u" { type = "table" }\n'
        'connector "bus" { type = "memory" }\n'
        'flow "f" {\n  from { connector = "bus" operation = "a" }\n'
        '  to { connector = "u" target = "a;drop" }\n'
        '  to { connector = "u" target = "events_${input.kind}" }\n}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(text, reg, {}, file="app.mycel")
    assert [str(p) for p in info.value.problems] == [
        "app.mycel:1: connector 't': low must not exceed high.",
        "app.mycel:9: flow 'f': 'a;drop' is not a table name.",
    ]
