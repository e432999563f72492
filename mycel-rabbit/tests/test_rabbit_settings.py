"""Settings and load-time checks of ``type = "rabbitmq"`` (no broker needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import mycel_rabbit
from mycel import ConfigError
from mycel.testing import load_test_config
from mycel_rabbit import RabbitConnector, RabbitFromOptions, RabbitSettings


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_test_config(text)
    return [str(p) for p in caught.value.problems]


def test_all_is_sorted_and_complete() -> None:
    assert mycel_rabbit.__all__ == sorted(mycel_rabbit.__all__)
    for name in mycel_rabbit.__all__:
        assert hasattr(mycel_rabbit, name)


def test_defaults_need_only_the_type() -> None:
    settings = RabbitSettings()
    assert settings.url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.exchange == "mycel"
    assert settings.exchange_type == "topic"
    assert settings.durable is True
    assert settings.publisher_confirms is True
    assert settings.prefetch is None
    assert settings.dead_letter_exchange == "mycel.dead-letter"
    assert settings.dead_letter_queue == "mycel.dead-letter"


def test_spec_examples_load_with_type_and_url_only() -> None:
    config = load_test_config(
        """
        connector "rabbit" {
          type = "rabbitmq"
          url  = "amqp://guest:guest@127.0.0.1:5672/"
        }
        connector "mem" { type = "memory" }
        flow "broadcast_price" {
          from { connector = "rabbit"  operation = "price.updated" }
          to   { connector = "mem"     target = "prices" }
        }
        flow "notify_on_insert" {
          from { connector = "mem"     operation = "orders.INSERT" }
          to   { connector = "rabbit"  target = "order.created" }
        }
        flow "audit" {
          from { connector = "rabbit"  operation = "audit.#" }
          to   { connector = "rabbit"  target = "copy.${input.kind}" }
        }
        """
    )
    spec = config.connectors["rabbit"]
    assert spec.cls is RabbitConnector
    assert config.flows["audit"].source.operation == "audit.#"


def test_queue_names_follow_prefix_and_from_option() -> None:
    from mycel import Runtime

    config = load_test_config(
        """
        connector "rabbit" {
          type = "rabbitmq"
          queue_prefix = "svc."
        }
        connector "mem" { type = "memory" }
        flow "a" {
          from { connector = "rabbit"  operation = "x.*" }
          to   { connector = "mem"     target = "t" }
        }
        flow "b" {
          from {
            connector = "rabbit"
            operation = "y.#"
            queue     = "existing-queue"
          }
          to   { connector = "mem"     target = "t" }
        }
        """
    )
    connector = Runtime(config).connectors["rabbit"]
    assert isinstance(connector, RabbitConnector)
    assert connector.queue_names() == {"a": "svc.a", "b": "existing-queue"}


def test_describe_masks_the_password() -> None:
    config = load_test_config(
        """
        connector "rabbit" {
          type = "rabbitmq"
          url  = "amqps://app:s3cret@broker.example:5671/prod"
        }
        """
    )
    from mycel import Runtime

    shown = Runtime(config).connectors["rabbit"].describe()
    assert shown["url"] == "amqps://app:***@broker.example:5671/prod"
    assert "s3cret" not in repr(shown)


def test_url_must_be_amqp_and_error_hides_password() -> None:
    found = problems(
        """
        connector "rabbit" {
          type = "rabbitmq"
          url  = "http://app:s3cret@broker:5672/"
        }
        """
    )
    assert len(found) == 1
    assert "'http://app:***@broker:5672/' is not an AMQP URL" in found[0]
    assert "s3cret" not in found[0]


def test_wildcards_need_a_topic_exchange() -> None:
    found = problems(
        """
        connector "rabbit" {
          type = "rabbitmq"
          exchange_type = "direct"
        }
        connector "mem" { type = "memory" }
        flow "f" {
          from { connector = "rabbit"  operation = "order.*" }
          to   { connector = "mem"     target = "t" }
        }
        """
    )
    assert len(found) == 1
    assert found[0].startswith("test.mycel:8: ")
    assert (
        "routing-key pattern 'order.*' has wildcards, but the exchange type is "
        "'direct'; wildcards need exchange_type = \"topic\""
    ) in found[0]


def test_wildcard_mixed_with_text_is_refused() -> None:
    found = problems(
        """
        connector "rabbit" { type = "rabbitmq" }
        connector "mem" { type = "memory" }
        flow "f" {
          from { connector = "rabbit"  operation = "order.cre*" }
          to   { connector = "mem"     target = "t" }
        }
        """
    )
    assert len(found) == 1
    assert (
        "routing-key pattern 'order.cre*': 'cre*' mixes a wildcard with text; "
        "'*' and '#' must stand alone between dots"
    ) in found[0]


def test_unknown_from_attribute_is_reported() -> None:
    found = problems(
        """
        connector "rabbit" { type = "rabbitmq" }
        connector "mem" { type = "memory" }
        flow "f" {
          from {
            connector = "rabbit"
            operation = "a.b"
            queeu     = "x"
          }
          to   { connector = "mem"     target = "t" }
        }
        """
    )
    assert found == [
        "test.mycel:8: flow 'f' from: unknown setting 'queeu'. Did you mean 'queue'?"
    ]


def test_mandatory_needs_confirms() -> None:
    with pytest.raises(ValidationError) as caught:
        RabbitSettings(mandatory=True, publisher_confirms=False)
    assert (
        "mandatory = true needs publisher_confirms = true: without confirms a "
        "returned message is not waited for"
    ) in str(caught.value)


def test_reserved_exchange_names_are_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        RabbitSettings(exchange="amq.topic")
    assert "'amq.topic': exchange names starting with 'amq.' are reserved" in str(
        caught.value
    )


def test_bad_queue_name_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        RabbitFromOptions(queue="has space")
    assert "'has space' is not a usable queue name" in str(caught.value)


def test_durations_and_dead_letter_block() -> None:
    config = load_test_config(
        """
        connector "rabbit" {
          type            = "rabbitmq"
          heartbeat       = "30s"
          publish_timeout = "500ms"
          prefetch        = 10
          dead_letter {
            exchange = "failed"
            queue    = "failed.all"
          }
        }
        """
    )
    settings = config.connectors["rabbit"].settings
    assert isinstance(settings, RabbitSettings)
    assert settings.heartbeat == 30.0
    assert settings.publish_timeout == 0.5
    assert settings.prefetch == 10
    assert settings.dead_letter_exchange == "failed"
    assert settings.dead_letter_queue == "failed.all"


def test_heartbeat_is_whole_seconds() -> None:
    with pytest.raises(ValidationError) as caught:
        RabbitSettings(heartbeat="500ms")
    assert "heartbeat must be whole seconds, not 0.5s" in str(caught.value)
    assert RabbitSettings(heartbeat="0s").heartbeat == 0.0
