"""The client driver: subscriptions to another GraphQL service as a source.

The protocol itself is gql's (the Python GraphQL client), whose WebSocket
transport speaks both ``graphql-transport-ws`` and ``graphql-ws``. What
this module adds is what gql leaves to its caller:

- one connection per connector carrying the subscriptions of every flow
  that reads from it (one gql session, one task per subscription);
- a reconnect loop with exponential backoff, full jitter within the upper
  half of the delay, capped at ``reconnect.max_delay`` and reset once a
  connection stayed up for ``reconnect.healthy_after``; every attempt is
  logged at WARNING. A single subscription that the server completes or
  answers with errors is sent again on the same connection, with the same
  backoff, without disturbing the others. gql's own ``reconnecting=True``
  session retries
  through the ``backoff`` package with its own policy and logging, and
  cannot reset after a healthy period, so it is not used;
- running the flow for every event, one at a time per subscription, in
  the order the server sent them.

Without a ``query`` in the ``from`` block the document is
``subscription { NAME }``, which only suits fields of a scalar type (JSON,
String, ...): a field of an object type needs an explicit ``query``
selecting its subfields.

"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gql import Client, GraphQLRequest
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport
from graphql import (
    FieldNode,
    GraphQLError,
    OperationDefinitionNode,
    OperationType,
    parse,
)

import mycel

from ._settings import ClientFromOptions, GraphqlSettings

__all__ = ["GraphqlClient", "subscription_document", "websocket_url"]

logger = logging.getLogger("mycel.graphql")


def websocket_url(endpoint: str, path: str | None) -> str:
    """``http://h:4000/graphql`` + ``/subscriptions`` -> ``ws://h:4000/subscriptions``."""
    parts = urlsplit(endpoint)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit(parts._replace(scheme=scheme, path=path or parts.path))


def subscription_document(field: str, query: str | None) -> tuple[str, str]:
    """The document to send for ``Subscription.field``, and its response key.

    Raise ValueError when ``query`` is not a subscription of that field.

    """
    if query is None:
        return f"subscription {{ {field} }}", field
    try:
        document = parse(query)
    except GraphQLError as exc:
        raise ValueError(f"the query does not parse: {exc.message}") from exc
    operations = [
        d for d in document.definitions if isinstance(d, OperationDefinitionNode)
    ]
    if len(operations) != 1 or operations[0].operation != OperationType.SUBSCRIPTION:
        raise ValueError("the query must hold exactly one subscription operation")
    selections = operations[0].selection_set.selections
    if len(selections) != 1 or not isinstance(selections[0], FieldNode):
        raise ValueError("the subscription must select exactly one field")
    node = selections[0]
    if node.name.value != field:
        raise ValueError(
            f"the query subscribes to {node.name.value!r}, not to {field!r}"
        )
    return query, node.alias.value if node.alias else field


class GraphqlClient:
    """The client half of a ``graphql`` connector."""

    def __init__(
        self, name: str, settings: GraphqlSettings, services: mycel.Services
    ) -> None:
        assert settings.endpoint is not None
        self.name = name
        self.settings = settings
        self.services = services
        self.url = websocket_url(settings.endpoint, settings.subscriptions.path)
        self.connected = asyncio.Event()
        """Set while a session is up and its subscriptions were sent."""
        self.connections = 0
        """Sessions opened so far (for tests and logs)."""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _make_transport(self) -> WebsocketsTransport:
        protocol = self.settings.subscriptions.protocol
        subprotocols: list[str] = (
            [
                WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL,
                WebsocketsTransport.APOLLO_SUBPROTOCOL,
            ]
            if protocol == "auto"
            else [protocol]
        )
        return WebsocketsTransport(
            url=self.url,
            headers=dict(self.settings.headers) or None,
            init_payload=dict(self.settings.connection_params),
            subprotocols=subprotocols,
        )

    async def start_sources(self, bindings: list[mycel.SourceBinding]) -> None:
        if not bindings or not self.settings.subscriptions.enabled:
            return
        self._stopping = False
        self._task = asyncio.create_task(self._run(bindings))

    async def stop_sources(self) -> None:
        self._stopping = True
        if self._task is None:
            return
        # Let the events being processed finish, then end the session.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 10.0)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self, bindings: list[mycel.SourceBinding]) -> None:
        """Keep one session up, subscribed for every binding, until stopped."""
        policy = self.settings.reconnect
        loop = asyncio.get_running_loop()
        attempt = 0
        while not self._stopping:
            started = loop.time()
            try:
                await self._session(bindings)
                error = "the session ended"
            except Exception as exc:  # any failure of the session: reconnect
                error = _describe(exc)
            finally:
                self.connected.clear()
            if self._stopping:
                return

            # Back off: exponential, jittered, capped, reset when it was healthy.
            if loop.time() - started >= policy.healthy_after:
                attempt = 0
            delay = self._delay(attempt)
            attempt += 1
            logger.warning(
                "connector %r: subscriptions to %s ended (%s); reconnecting in "
                "%.2fs (attempt %d)",
                self.name,
                self.url,
                error,
                delay,
                attempt,
            )
            await asyncio.sleep(delay)

    def _delay(self, attempt: int) -> float:
        """Seconds to wait before try ``attempt + 1``, with jitter."""
        policy = self.settings.reconnect
        delay: float = min(policy.max_delay, policy.initial_delay * 2**attempt)
        return delay * random.uniform(0.5, 1.0)

    async def _session(self, bindings: list[mycel.SourceBinding]) -> None:
        transport = self._make_transport()
        client = Client(transport=transport, fetch_schema_from_transport=False)
        async with client as session:
            self.connections += 1
            logger.info("connector %r connected to %s", self.name, self.url)
            async with asyncio.TaskGroup() as group:
                for binding in bindings:
                    group.create_task(self._follow(session, binding))
                self.connected.set()
            # Every subscription completed without error.

    async def _follow(self, session: Any, binding: mycel.SourceBinding) -> None:
        """Run the flow for every event of one subscription, in order."""
        field = binding.operation.removeprefix("Subscription.")
        options = binding.options
        query: str | None = None
        variables: dict[str, Any] = {}
        if isinstance(options, ClientFromOptions):
            query, variables = options.query, dict(options.variables)
        document, key = subscription_document(field, query)
        request = GraphQLRequest(document, variable_values=variables or None)
        context = {"operation": binding.operation, "endpoint": self.url}

        # A subscription the server ends or refuses is sent again on the same
        # connection, with backoff; a broken connection ends the session.
        attempt = 0
        while True:
            try:
                async for data in session.subscribe(request):
                    attempt = 0
                    await self._process(binding, mycel.Event(data.get(key), context))
                reason = "the server completed it"
            except TransportQueryError as exc:
                reason = f"the server answered with errors: {exc}"
            delay = self._delay(attempt)
            attempt += 1
            logger.warning(
                "connector %r: subscription of flow %r ended (%s); subscribing "
                "again in %.2fs (attempt %d)",
                self.name,
                binding.flow,
                reason,
                delay,
                attempt,
            )
            await asyncio.sleep(delay)

    async def _process(self, binding: mycel.SourceBinding, event: mycel.Event) -> None:
        self._busy += 1
        self._idle.clear()
        try:
            await binding.handle.process(event)
        except mycel.FlowError as exc:
            # No acknowledgement to withhold: the event is lost, say so.
            logger.error(
                "connector %r: flow %r gave up on an event: %s",
                self.name,
                binding.flow,
                exc.reason,
            )
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()


def _describe(exc: BaseException) -> str:
    """One line saying why a session ended (the first error of a group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, TransportQueryError):
        return f"the server refused a subscription: {exc}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
