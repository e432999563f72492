"""The ``elasticsearch`` connector: payloads become documents.

``to { connector = "es"  operation = "index"  target = "orders" }`` indexes
each payload into ``orders`` under the id the ``to`` block's ``id``
expression gives, or else the payload's ``id`` field, so that a redelivered
event overwrites its document instead of adding a second one. ``update``
merges the payload into the document (``doc_as_upsert`` creates it when
missing), ``delete`` removes it (a document already gone is a success).

The connector speaks the ``_bulk`` HTTP API itself, through httpx, so one
code path serves Elasticsearch 7 to 9 and OpenSearch alike: the official
Python clients check the server's product or refuse a version they were
not built for, which the API itself does not need.

Known limitations: no index templates or mappings are created (the
cluster's dynamic mapping, or an index set up beforehand, applies); no
sniffing of the cluster's nodes; ``index`` without any id lets the cluster
choose one, so a redelivered event then gives a second document.

"""

from __future__ import annotations

import asyncio
import re
import ssl
import weakref
from collections.abc import Mapping
from typing import Any, Literal

import httpx
from prometheus_client import CollectorRegistry, Counter

from mycel import (
    Connector,
    ConnectorError,
    Delivery,
    DeliveryError,
    Expression,
    ExpressionError,
    Operation,
    Settings,
    redact_url,
)

from ._bulk import Action, BulkClient, Bulker, encode, error_text
from ._settings import DEFAULT_URL, ElasticsearchSettings, ElasticsearchToOptions

__all__ = ["ElasticsearchConnector"]

_metrics: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Counter, Counter]] = (
    weakref.WeakKeyDictionary()
)


def _counters(registry: CollectorRegistry) -> tuple[Counter, Counter]:
    # One pair per registry, shared by every elasticsearch connector in it.
    found = _metrics.get(registry)
    if found is None:
        found = (
            Counter(
                "mycel_elasticsearch_requests",
                "Bulk requests sent by elasticsearch targets, resends included",
                ["connector"],
                registry=registry,
            ),
            Counter(
                "mycel_elasticsearch_documents",
                "Documents accepted by elasticsearch targets",
                ["connector"],
                registry=registry,
            ),
        )
        _metrics[registry] = found
    return found


# What Elasticsearch and OpenSearch accept as an index name.
_INDEX = re.compile(r'[^-_+A-Z\\/*?"<>| ,#:][^A-Z\\/*?"<>| ,#:]*')


def check_index(name: str) -> str | None:
    """Why ``name`` cannot be an index name, or None when it can."""
    if len(name.encode()) > 255:
        return f"index name {name!r} is longer than 255 bytes"
    if name in (".", "..") or _INDEX.fullmatch(name) is None:
        return (
            f"{name!r} is not a valid index name (lowercase, no spaces or "
            '\\ / * ? " < > | , # :, not starting with - _ +)'
        )
    return None


class ElasticsearchConnector(Connector):
    """Documents into Elasticsearch or OpenSearch; see the module docstring."""

    type_name = "elasticsearch"
    settings_model = ElasticsearchSettings
    target_operations = (
        Operation("index", "index (create or replace) the payload as a document"),
        Operation("update", "merge the payload into the document with its id"),
        Operation("delete", "delete the document with the event's id"),
    )
    default_operation = "index"
    target_required = True
    to_options = ElasticsearchToOptions

    @classmethod
    def check_binding(
        cls,
        settings: Settings,
        role: Literal["source", "target"],
        operation: str,
        options: Settings | None,
    ) -> list[str]:
        if not isinstance(options, ElasticsearchToOptions) or options.id is None:
            return []
        try:
            Expression(options.id)
        except ExpressionError as exc:
            # Functions come from plugins, which this check cannot see; the
            # connector compiles the expression again with them.
            if "unknown function" not in str(exc):
                return [f"id: {exc}"]
        return []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.settings, ElasticsearchSettings)
        self._settings: ElasticsearchSettings = self.settings
        self._nodes = self._settings.nodes or [self._settings.url or DEFAULT_URL]
        self._ids: dict[str, Expression] = {}
        self._http: httpx.AsyncClient | None = None
        self._bulker: Bulker | None = None
        requests, documents = _counters(self.services.metrics.registry)
        self._requests = requests.labels(self.name)
        self._documents = documents.labels(self.name)

    def bind_target(self, operation: str, options: Settings | None) -> None:
        if isinstance(options, ElasticsearchToOptions) and options.id is not None:
            self._id_expression(options.id)

    def _id_expression(self, source: str) -> Expression:
        expression = self._ids.get(source)
        if expression is None:
            expression = self._ids[source] = self.services.compile_expression(source)
        return expression

    async def start(self) -> None:
        settings = self._settings
        self._http = httpx.AsyncClient(
            auth=self._auth(),
            headers=self._headers(),
            timeout=settings.timeout,
            verify=self._verify(),
            limits=httpx.Limits(max_connections=settings.max_requests + 2),
        )
        client = BulkClient(settings, self._http, self._nodes)

        # One request up front, so that a wrong URL or credentials stop the
        # start with a clear error rather than fail every event.
        shown = ", ".join(redact_url(node) for node in self._nodes)
        version: dict[str, Any] = {}
        error: Exception | None = None
        for _ in self._nodes:
            try:
                response = await client.request("GET", "/")
                if response.status_code >= 400:
                    raise ConnectorError(
                        f"HTTP {response.status_code}: {error_text(response)}"
                    )
                version = response.json().get("version", {})
            except (httpx.HTTPError, ConnectorError, ValueError, AttributeError) as exc:
                error = exc
                continue
            error = None
            break
        if error is not None:
            await self._http.aclose()
            raise ConnectorError(
                f"elasticsearch {self.name!r}: cannot reach {shown}: {error}"
            ) from error
        self.services.logger.info(
            "elasticsearch %r: connected to %s %s at %s",
            self.name,
            version.get("distribution", "elasticsearch"),
            version.get("number", "?"),
            shown,
        )
        self._bulker = Bulker(client, settings)
        self._bulker.on_request = self._requests.inc
        self._bulker.start()

    def _auth(self) -> httpx.BasicAuth | None:
        settings = self._settings
        if settings.username is None or settings.password is None:
            return None
        return httpx.BasicAuth(settings.username, settings.password.get_secret_value())

    def _headers(self) -> dict[str, str]:
        if self._settings.api_key is None:
            return {}
        return {"Authorization": f"ApiKey {self._settings.api_key.get_secret_value()}"}

    def _verify(self) -> ssl.SSLContext | bool:
        if self._settings.ca_certs is None:
            return self._settings.verify_certs
        path = self.services.base_dir / self._settings.ca_certs
        return ssl.create_default_context(cafile=str(path))

    async def close(self) -> None:
        if self._bulker is not None:
            await self._bulker.close()
            self._bulker = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def deliver(self, delivery: Delivery) -> None:
        assert self._bulker is not None, "the elasticsearch connector is not started"

        # Where the document goes and under which id.
        index = delivery.target or ""
        problem = check_index(index)
        if problem is not None:
            raise DeliveryError(problem, permanent=True)
        operation = delivery.operation
        doc_id = self._document_id(delivery)
        if doc_id is None and operation != "index":
            raise DeliveryError(
                f"index {index!r}: {operation} needs a document id: the payload has "
                "no 'id' and the to block gives no id expression",
                permanent=True,
            )

        # The bulk lines: the action, then the document for index and update.
        meta: dict[str, Any] = {"_index": index}
        if doc_id is not None:
            meta["_id"] = doc_id
        body = encode({operation: meta})
        payload = delivery.payload
        if operation != "delete":
            if not isinstance(payload, Mapping):
                raise DeliveryError(
                    f"index {index!r}: the payload must be an object, "
                    f"not {type(payload).__name__}",
                    permanent=True,
                )
            if operation == "update":
                options = delivery.options
                upsert = (
                    isinstance(options, ElasticsearchToOptions)
                    and options.doc_as_upsert
                )
                document: Any = (
                    {"doc": payload, "doc_as_upsert": True}
                    if upsert
                    else {"doc": payload}
                )
            else:
                document = payload
            try:
                body += encode(document)
            except (TypeError, ValueError) as exc:
                raise DeliveryError(
                    f"index {index!r}: the payload is not JSON: {exc}", permanent=True
                ) from exc

        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._bulker.submit(Action(operation, index, doc_id, body, future))
        self._documents.inc()

    def _document_id(self, delivery: Delivery) -> str | None:
        options = delivery.options
        if isinstance(options, ElasticsearchToOptions) and options.id is not None:
            variables = {
                "input": delivery.input,
                "output": delivery.payload,
                "context": delivery.context,
            }
            try:
                value = self._id_expression(options.id).evaluate(variables)
            except ExpressionError as exc:
                raise DeliveryError(f"id: {exc}", permanent=True) from exc
            what = f"id expression {options.id!r}"
        else:
            payload = delivery.payload
            value = payload.get("id") if isinstance(payload, Mapping) else None
            what = "the payload's 'id'"
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise DeliveryError(
                f"{what} gave {value!r}: a document id must be a string or a number",
                permanent=True,
            )
        if isinstance(value, float):
            value = int(value) if value.is_integer() else value
        text = str(value)
        if not text or len(text.encode()) > 512:
            raise DeliveryError(
                f"{what} gave {text!r}: a document id has 1 to 512 bytes",
                permanent=True,
            )
        return text
