"""The settings of ``type = "elasticsearch"`` and of its ``to`` blocks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator

from mycel import Duration, Settings

__all__ = ["ElasticsearchSettings", "ElasticsearchToOptions"]

DEFAULT_URL = "http://127.0.0.1:9200"


class ElasticsearchSettings(Settings):
    """Settings of ``type = "elasticsearch"``."""

    url: str | None = None
    """The cluster's URL (default ``http://127.0.0.1:9200``); a password in
    it is never shown."""

    nodes: list[str] | None = Field(default=None, min_length=1)
    """Several node URLs instead of ``url``: requests go round-robin, and a
    node that cannot be reached is skipped."""

    username: str | None = None
    """User for basic authentication."""

    password: SecretStr | None = None
    """Password for basic authentication."""

    api_key: SecretStr | None = Field(default=None, validate_default=True)
    """An API key (the base64 ``id:key`` form), sent as ``ApiKey``."""

    @field_validator("api_key")
    @classmethod
    def _check_auth(
        cls, api_key: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        # Checked on the last of these fields, so the error has a line.
        data = info.data
        if data.get("url") is not None and data.get("nodes") is not None:
            raise ValueError("give either url or nodes, not both")
        if (data.get("username") is None) != (data.get("password") is None):
            raise ValueError("basic authentication needs both username and password")
        if api_key is not None and data.get("username") is not None:
            raise ValueError("give either api_key or username and password, not both")
        return api_key

    verify_certs: bool = True
    """Check the server's TLS certificate."""

    ca_certs: str | None = None
    """A CA bundle (PEM file, relative to the configuration directory) to
    check the server's certificate against."""

    timeout: Duration = Field(default=30.0, gt=0)
    """How long one bulk request may take."""

    batch_size: int = Field(default=500, ge=1, le=100_000)
    """Most documents in one bulk request."""

    batch_bytes: int = Field(default=5_000_000, ge=1024)
    """Most bytes in one bulk request (a single larger document still goes,
    alone)."""

    flush_interval: Duration = Field(default=0.0, ge=0)
    """How long a partial batch waits for more documents. ``0``: send as
    soon as a request slot is free; documents that arrive meanwhile go
    together in the next request."""

    max_requests: int = Field(default=4, ge=1, le=256)
    """Bulk requests in flight at once."""

    retries: int = Field(default=3, ge=0, le=100)
    """Resends of a request, or of its documents, that got 429, a 5xx or no
    answer, before the delivery fails (and the flow's retry takes over)."""

    retry_delay: Duration = Field(default=0.1, gt=0)
    """The first pause before a resend; doubled each time, up to 10s."""

    refresh: Literal["false", "true", "wait_for"] = "false"
    """The bulk ``refresh`` parameter: ``wait_for`` returns once the
    documents are searchable."""


class ElasticsearchToOptions(Settings):
    """Extra attributes of a ``to`` block that writes to Elasticsearch."""

    id: str | None = None
    """A CEL expression for the document id (``"input.order_id"``); the
    payload's ``id`` field when not given."""

    doc_as_upsert: bool = False
    """For ``update``: create the document from the payload when it does not
    exist yet (otherwise such an update fails)."""
