"""Loading plugins: good ones, broken ones, and what the registry knows."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from mycel import (
    ConfigError,
    Connector,
    Operation,
    _builtin,
    hookimpl,
    load_config_text,
)
from mycel._plugins import load_plugins


class Good(Connector):
    type_name = "good"
    source_operations = (Operation("tick", "a tick"),)


class GoodPlugin:
    @hookimpl
    def mycel_connector_types(self) -> Sequence[type[Connector]]:
        return [Good]

    @hookimpl
    def mycel_expression_functions(self) -> dict[str, object]:
        return {"double": lambda x: x * 2}


class BrokenPlugin:
    @hookimpl
    def mycel_connector_types(self) -> Sequence[type[Connector]]:
        raise ImportError("no module named 'libfoo'")


class MisspelledPlugin:
    @hookimpl
    def mycel_connector_typs(self) -> Sequence[type[Connector]]:
        return [Good]


class NotAConnectorPlugin:
    @hookimpl
    def mycel_connector_types(self) -> Sequence[object]:
        return [object]


class DuplicatePlugin:
    @hookimpl
    def mycel_connector_types(self) -> Sequence[type[Connector]]:
        return [Good]


class ExtraOperations:
    @hookimpl
    def mycel_connector_operations(
        self, type_name: str
    ) -> dict[str, list[Operation]] | None:
        if type_name == "good":
            return {"source": [Operation("tock", "a tock")]}
        return None


def load(*plugins: tuple[str, object]) -> object:
    return load_plugins([("builtin", _builtin), *plugins], entry_point_group=None)


def test_good_plugin_provides_types_and_functions() -> None:
    registry = load(("good", GoodPlugin()))
    assert registry.connector_types["good"] is Good
    assert registry.functions["double"](2) == 4
    (info,) = [p for p in registry.plugins if p.name == "good"]
    assert (info.status, info.connector_types, info.functions) == (
        "ok",
        ["good"],
        ["double"],
    )


def test_broken_plugin_is_recorded_with_its_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="mycel.plugins"):
        registry = load(("broken", BrokenPlugin()), ("good", GoodPlugin()))
    (info,) = [p for p in registry.plugins if p.name == "broken"]
    assert info.status == "error"
    assert info.error == "ImportError: no module named 'libfoo'"
    assert "Traceback" in (info.traceback or "")
    assert "good" in registry.connector_types
    assert caplog.records[0].getMessage() == "plugin 'broken' (broken) failed to load"
    assert caplog.records[0].levelno == logging.ERROR


def test_misspelled_hook_fails_that_plugin_at_load_time() -> None:
    registry = load(("typo", MisspelledPlugin()))
    (info,) = [p for p in registry.plugins if p.name == "typo"]
    assert info.status == "error"
    assert "mycel_connector_typs" in (info.error or "")


def test_plugin_returning_a_non_connector_fails() -> None:
    registry = load(("bad", NotAConnectorPlugin()))
    (info,) = [p for p in registry.plugins if p.name == "bad"]
    assert (
        info.error == "TypeError: <class 'object'> is not a subclass of mycel.Connector"
    )


def test_second_plugin_with_the_same_type_fails() -> None:
    registry = load(("good", GoodPlugin()), ("dup", DuplicatePlugin()))
    (info,) = [p for p in registry.plugins if p.name == "dup"]
    assert (
        info.error == "TypeError: connector type 'good' is already provided by 'good'"
    )
    assert registry.type_plugin["good"].name == "good"


def test_operations_can_be_contributed_to_another_type() -> None:
    registry = load(("good", GoodPlugin()), ("extra", ExtraOperations()))
    assert [op.pattern for op in registry.source_operations("good")] == ["tick", "tock"]


def test_broken_plugin_only_breaks_configurations_that_use_it() -> None:
    registry = load(("broken", BrokenPlugin()))
    config = load_config_text('connector "bus" { type = "memory" }\n', registry, {})
    assert list(config.connectors) == ["bus"]


def test_configuration_using_a_failed_known_plugin_names_the_failure() -> None:
    class FailedWs:
        @hookimpl
        def mycel_connector_types(self) -> Sequence[type[Connector]]:
            raise RuntimeError("websockets too old")

    registry = load_plugins(
        [("builtin", _builtin), ("mycel-ws", FailedWs())], entry_point_group=None
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(
            'connector "ws" { type = "websocket" }\n', registry, {}, file="a.mycel"
        )
    assert [str(p) for p in info.value.problems] == [
        "a.mycel:1: connector 'ws': unknown connector type 'websocket'. The plugin "
        "'mycel-ws' that provides it failed to load: RuntimeError: websockets too old. "
        "See 'mycel plugins list'."
    ]


def test_installed_entry_points_include_core() -> None:
    registry = load_plugins()
    (core,) = [p for p in registry.plugins if p.distribution == "mycel"]
    assert core.status == "ok"
    assert {"memory", "http"} <= set(core.connector_types)
