"""RabbitMQ source and target for Mycel (``type = "rabbitmq"``).

Install ``mycel-rabbit`` and the connector type is found through the
``mycel`` entry points; nothing needs importing. The names below are public
for embedders and for tests.

"""

from __future__ import annotations

from ._codec import decode_body, encode_payload
from ._connector import RabbitConnector
from ._settings import DeadLetterSettings, RabbitFromOptions, RabbitSettings

__all__ = [
    "DeadLetterSettings",
    "RabbitConnector",
    "RabbitFromOptions",
    "RabbitSettings",
    "decode_body",
    "encode_payload",
]

__version__ = "0.1.0"
