"""Settings of ``type = "rabbitmq"`` and of its ``from`` blocks.

Every setting has a default, so a connector block with only ``type`` (and
``url`` where the broker is not on localhost) works: flows meet on the
durable topic exchange ``mycel``, each flow reads its own durable queue
``mycel.<flow name>``, and failed messages end in ``mycel.dead-letter``.

"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from mycel import Duration, Settings, redact_url

__all__ = [
    "DeadLetterSettings",
    "RabbitFromOptions",
    "RabbitSettings",
    "check_pattern",
]

_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,255}$")


def _check_name(value: str | None, what: str) -> str | None:
    if value is not None and not _NAME.match(value):
        raise ValueError(
            f"{value!r} is not a usable {what} name; use letters, digits, "
            "'.', '_', '-' and ':' (at most 255)"
        )
    return value


class DeadLetterSettings(Settings):
    """The ``dead_letter { ... }`` block: where failed messages go."""

    exchange: str | None = None
    """Exchange failed messages are published to (a topic exchange, durable
    when ``durable`` is); default: ``<exchange>.dead-letter``."""

    queue: str | None = None
    """Queue bound to that exchange with ``#``, so that nothing published
    there is lost; default: ``<queue_prefix>dead-letter``."""

    @field_validator("exchange", "queue")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return _check_name(value, "dead-letter")


class RabbitSettings(Settings):
    """Settings of ``type = "rabbitmq"``."""

    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """Broker address, ``amqp://`` or ``amqps://``, with user, password and
    virtual host (``/`` is ``%2F``). The password is never logged."""

    exchange: str = "mycel"
    """Exchange that sources bind their queues to and targets publish to."""

    exchange_type: Literal["topic", "direct", "fanout"] = "topic"
    """Kind of that exchange; declared when missing."""

    durable: bool = True
    """Declare the exchange and the queues durable (they outlive a broker
    restart). Published messages are persistent either way."""

    queue_prefix: str = "mycel."
    """A flow reads the queue ``<queue_prefix><flow name>`` unless its
    ``from`` block names one with ``queue``."""

    prefetch: int | None = Field(default=None, ge=1, le=65535)
    """Unacknowledged messages the broker sends each flow's consumer ahead;
    default: the flow's ``concurrency``."""

    publisher_confirms: bool = True
    """A ``to`` block returns only when the broker confirmed the message.
    Without it, a message lost in a broker failure is not noticed."""

    mandatory: bool = False
    """Fail a ``to`` block whose routing key reaches no queue (the broker
    returns the message) instead of letting the broker discard it."""

    heartbeat: Duration = Field(default=60.0, ge=0)
    """AMQP heartbeat interval, in whole seconds; a connection that stays
    silent for a few intervals counts as lost. ``0`` turns heartbeats off."""

    connect_timeout: Duration = Field(default=10.0, gt=0)
    """How long one connection attempt may take."""

    reconnect_delay: Duration = Field(default=0.5, gt=0)
    """Wait before the first reconnection attempt; doubles for each further
    attempt (with jitter) up to ``reconnect_max_delay``."""

    reconnect_max_delay: Duration = Field(default=30.0, gt=0)
    """Longest wait between two reconnection attempts."""

    publish_timeout: Duration = Field(default=10.0, gt=0)
    """How long a ``to`` block waits for a connection and for the broker's
    confirmation before it fails (and its flow retries)."""

    dead_letter: DeadLetterSettings = DeadLetterSettings()
    """Where messages go when their flow gave up or their body is not JSON."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
        except ValueError as exc:
            raise ValueError(f"{redact_url(value)!r} is not a URL") from exc
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError(
                f"{redact_url(value)!r} is not an AMQP URL; write it like "
                "amqp://user:password@host:5672/vhost"
            )
        return value

    @field_validator("heartbeat")
    @classmethod
    def _heartbeat(cls, value: float) -> float:
        if value != int(value):
            raise ValueError(f"heartbeat must be whole seconds, not {value:g}s")
        return value

    @field_validator("exchange")
    @classmethod
    def _exchange(cls, value: str) -> str:
        _check_name(value, "exchange")
        if value.startswith("amq."):
            raise ValueError(
                f"{value!r}: exchange names starting with 'amq.' are reserved"
            )
        return value

    @field_validator("queue_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value:
            _check_name(value, "queue prefix")
        return value

    @model_validator(mode="after")
    def _mandatory_needs_confirms(self) -> RabbitSettings:
        if self.mandatory and not self.publisher_confirms:
            raise ValueError(
                "mandatory = true needs publisher_confirms = true: without "
                "confirms a returned message is not waited for"
            )
        return self

    @property
    def dead_letter_exchange(self) -> str:
        return self.dead_letter.exchange or f"{self.exchange}.dead-letter"

    @property
    def dead_letter_queue(self) -> str:
        return self.dead_letter.queue or f"{self.queue_prefix}dead-letter"


class RabbitFromOptions(Settings):
    """Extra attributes of a ``from`` block that reads RabbitMQ."""

    queue: str | None = None
    """Consume this queue instead of ``<queue_prefix><flow name>``. It is
    declared when missing and used as it is when it exists."""

    bind: bool = True
    """Bind the queue to the connector's exchange with the operation's
    pattern. Set to false to consume a queue that is fed some other way."""

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str | None) -> str | None:
        return _check_name(value, "queue")


_WORD = re.compile(r"^(?:\*|#|[^*#]*)$")


def check_pattern(pattern: str, exchange_type: str) -> list[str]:
    """Problems of a source operation as a binding key, for the loader.

    >>> check_pattern("order.*", "topic")
    []

    """
    problems: list[str] = []
    if len(pattern.encode()) > 255:
        problems.append(f"routing-key pattern {pattern!r} is longer than 255 bytes")
    if exchange_type == "topic":
        bad = [word for word in pattern.split(".") if not _WORD.match(word)]
        if bad:
            problems.append(
                f"routing-key pattern {pattern!r}: {bad[0]!r} mixes a wildcard "
                "with text; '*' and '#' must stand alone between dots"
            )
    elif "*" in pattern or "#" in pattern:
        problems.append(
            f"routing-key pattern {pattern!r} has wildcards, but the exchange "
            f'type is {exchange_type!r}; wildcards need exchange_type = "topic"'
        )
    return problems
