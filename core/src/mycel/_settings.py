"""The building blocks of connector settings models.

Every connector type declares its settings as a subclass of
:class:`Settings`. Unknown settings are errors (``extra="forbid"``), so a
typo never goes unnoticed. Durations are :data:`Duration` (seconds as a
float, written ``"500ms"``, ``"30s"``, ``"5m"`` or ``"1h"``), secrets are
:class:`pydantic.SecretStr`, and URLs that may carry a password are shown
through :func:`redact_url`.

"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr

__all__ = ["Duration", "Settings", "parse_duration", "redact_url", "shown_value"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> Any:
    """``"500ms"`` -> 0.5; numbers are seconds; anything else is left to fail.

    >>> parse_duration("5m")
    300.0

    """
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(
                f'{value!r} is not a duration; write it like "500ms", '
                '"30s", "5m" or "1h"'
            )
        return float(match.group(1)) * _UNITS[match.group(2)]
    if isinstance(value, bool):
        raise ValueError("a duration cannot be true or false")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written in the configuration as ``"500ms"``, ``"30s"``, ``"5m"``."""


class Settings(BaseModel):
    """Base of every connector settings model and block model.

    Subclasses add typed fields with defaults; the field's docstring (or
    ``Field(description=...)``) becomes its line in the generated reference.

    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True
    )


def redact_url(url: str) -> str:
    """``amqp://guest:secret@host/`` -> ``amqp://guest:***@host/``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


_SECRET_NAME = re.compile(r"password|secret|token|api_key|apikey|credential", re.I)


def shown_value(name: str, value: Any) -> Any:
    """What may be printed of a setting's value: secrets masked.

    Works through nested blocks and lists, so that a whole block given as
    the input of an error shows no secret either.

    """
    if isinstance(value, SecretStr) or (
        _SECRET_NAME.search(name)
        and isinstance(value, str | int | float | bytes)
        and not isinstance(value, bool)
        and value != ""
    ):
        return "***"
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    if isinstance(value, dict):
        return {k: shown_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [shown_value(name, v) for v in value]
    return value
