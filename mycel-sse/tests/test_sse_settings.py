"""Settings and load-time checks of the sse connector."""

from __future__ import annotations

import pytest

import mycel_sse
from mycel import ConfigError
from mycel.testing import load_test_config

FLOW = """
connector "mem" { type = "memory" }
connector "sse" {
  type = "sse"
  %s
}
flow "f" {
  from { connector = "mem"  operation = "t" }
  to   { connector = "sse"  %s }
}
"""


def problems(settings: str, to: str = 'operation = "broadcast"') -> list[str]:
    """The problems found, less core's follow-up about the broken connector."""
    with pytest.raises(ConfigError) as info:
        load_test_config(FLOW % (settings, to))
    found = [problem.message for problem in info.value.problems]
    return [p for p in found if p != "flow 'f': no connector named 'sse'"]


def test_public_names_are_exported_sorted() -> None:
    exported = [n for n in dir(mycel_sse) if not n.startswith("_")]
    assert mycel_sse.__all__ == sorted(mycel_sse.__all__)
    assert set(mycel_sse.__all__) == set(exported) - {"annotations"}


def test_defaults_and_durations() -> None:
    config = load_test_config(
        FLOW % ('heartbeat_interval = "500ms"\n history_ttl = "5m"', "")
    )
    settings = config.connectors["sse"].settings
    assert settings.model_dump() == {
        "host": "127.0.0.1",
        "port": 8080,
        "path": "/events",
        "heartbeat_interval": 0.5,
        "retry": None,
        "history_size": 100,
        "history_ttl": 300.0,
        "send_queue": 1000,
        "send_buffer": 262144,
        "unsent_limit": 65536,
        "send_timeout": 10.0,
        "max_query_length": 2048,
        "cors": None,
        "auth": None,
    }
    assert config.flows["f"].to[0].operation.source == "broadcast"


def test_unknown_setting_and_bad_values_are_reported_together() -> None:
    found = problems('pathh = "/x"\n path = "/x/"\n send_queue = 0')
    assert found == [
        "connector 'sse': unknown setting 'pathh'",
        "connector 'sse': setting 'path' = '/x/': '/x/' is not a usable path; "
        'write it like "/events" (starts with /, no trailing /, letters, '
        "digits, _ - . ~)",
        "connector 'sse': setting 'send_queue' = 0: Input should be greater "
        "than or equal to 1",
    ]


def test_cors_origin_must_be_an_origin() -> None:
    found = problems('cors { origins = ["app.example/x"] }')
    assert found == [
        "connector 'sse': setting 'cors.origins' = ['app.example/x']: "
        "'app.example/x' is not an origin; write it like "
        '"https://app.example" or "http://localhost:3000" (no path)'
    ]


def test_event_name_gap_is_reserved() -> None:
    found = problems("", 'operation = "broadcast"\n event = "gap"')
    assert found == [
        "flow 'f' to: setting 'event' = 'gap': event name 'gap' is reserved "
        "for the replay gap signal; choose another name"
    ]


def test_stream_operation_with_bad_characters_is_refused_at_load() -> None:
    found = problems("", 'operation = "stream:a b"')
    assert found == [
        "flow 'f': connector 'sse' (sse) has no target operation 'stream:a b'"
    ]


def test_unknown_to_attribute_is_refused() -> None:
    found = problems("", 'operation = "broadcast"\n evnt = "x"')
    assert found == ["flow 'f' to: unknown setting 'evnt'"]


def test_cors_credentials_need_listed_origins() -> None:
    found = problems('cors {\n origins = ["*"]\n credentials = true\n}')
    assert found == [
        "connector 'sse': setting 'cors' = {'origins': ['*'], 'credentials': "
        'True}: credentials cannot be allowed for origins = ["*"]; list the '
        "origins instead"
    ]
