"""The elasticsearch target against a real search server, through flows.

The server is osmem-server (see ``testsupport/search.py``), which speaks the
Elasticsearch/OpenSearch API. Faults it never produces (429, 503) come from
a small forwarding proxy in front of it: the documents still land in the
real server. The seed flow ``sync_to_elastic`` runs from a ``memory``
connector standing in for its source, and once more, at the end, from the
real CDC connector of mycel-cdc when that is installed.

"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mycel import AsgiServer, ConfigError, ConnectorError
from mycel.testing import App, eventually, load_test_config, running
from testsupport.base import service_unavailable


def es_config(url: str, flows: str, extra: str = "") -> str:
    return f"""
    connector "rabbit" {{ type = "memory" }}
    connector "es" {{
      type = "elasticsearch"
      url  = "{url}"
      {extra}
    }}
    {flows}
    """


SYNC_TO_ELASTIC = """
flow "sync_to_elastic" {
  from { connector = "rabbit"  operation = "orders.*" }
  to   { connector = "es"      operation = "index"  target = "orders" }
}
"""


async def settle(app: App) -> list[str]:
    await asyncio.wait_for(app.memory("rabbit").drain(), 20)
    return [reason for _, _, reason in app.memory("rabbit").dead_letters]


async def fetch(url: str, path: str) -> Any:
    async with httpx.AsyncClient() as client:
        response = await client.get(url + path)
        return response.json()


async def count(url: str, index: str) -> int:
    async with httpx.AsyncClient() as client:
        await client.post(f"{url}/{index}/_refresh")
        response = await client.get(f"{url}/{index}/_count")
        return int(response.json()["count"])


async def test_sync_to_elastic_indexes_orders_by_id(search_url: str) -> None:
    async with running(es_config(search_url, SYNC_TO_ELASTIC)) as app:
        await app.publish("rabbit", "orders.created", {"id": 1, "status": "new"})
        await app.publish("rabbit", "orders.created", {"id": 2, "status": "new"})
        assert await settle(app) == []
        await app.publish("rabbit", "orders.updated", {"id": 1, "status": "paid"})
        # A redelivered event replaces its document, never adds one.
        await app.publish("rabbit", "orders.updated", {"id": 1, "status": "paid"})
        await app.publish("rabbit", "invoices.created", {"id": 9})
        assert await settle(app) == []

    document = await fetch(search_url, "/orders/_doc/1")
    assert document["_source"] == {"id": 1, "status": "paid"}
    assert document["_version"] == 3
    assert await count(search_url, "orders") == 2


async def test_id_expression_and_index_template(search_url: str) -> None:
    flows = """
    flow "f" {
      from { connector = "rabbit"  operation = "orders" }
      transform {
        total = "input.total"
      }
      to {
        connector = "es"
        target    = "orders-${input.region}"
        id        = "input.order_id"
      }
    }
    """
    async with running(es_config(search_url, flows)) as app:
        await app.publish(
            "rabbit", "orders", {"order_id": "A-1", "region": "eu", "total": 5}
        )
        await app.publish(
            "rabbit", "orders", {"order_id": 7, "region": "us", "total": 6}
        )
        assert await settle(app) == []
    assert (await fetch(search_url, "/orders-eu/_doc/A-1"))["_source"] == {"total": 5}
    assert (await fetch(search_url, "/orders-us/_doc/7"))["_source"] == {"total": 6}


async def test_update_and_delete(search_url: str) -> None:
    flows = """
    flow "upd" {
      from { connector = "rabbit"  operation = "upd" }
      to   { connector = "es"  operation = "update"  target = "orders" }
    }
    flow "ups" {
      from { connector = "rabbit"  operation = "ups" }
      to {
        connector     = "es"
        operation     = "update"
        target        = "orders"
        doc_as_upsert = true
      }
    }
    flow "del" {
      from { connector = "rabbit"  operation = "del" }
      to   { connector = "es"  operation = "delete"  target = "orders" }
    }
    """
    async with running(es_config(search_url, flows)) as app:
        await app.publish("rabbit", "ups", {"id": 1, "status": "new", "total": 3})
        await app.publish("rabbit", "ups", {"id": 2, "status": "new"})
        assert await settle(app) == []
        await app.publish("rabbit", "upd", {"id": 1, "status": "paid"})
        await app.publish("rabbit", "upd", {"id": 9, "status": "paid"})
        await app.publish("rabbit", "del", {"id": 2})
        await app.publish("rabbit", "del", {"id": 404})
        assert await settle(app) == [
            "flow 'upd': to 'es' failed after 1 try: index 'orders' document '9': "
            "document_missing_exception: [9]: document missing"
        ]
    assert (await fetch(search_url, "/orders/_doc/1"))["_source"] == {
        "id": 1,
        "status": "paid",
        "total": 3,
    }
    assert (await fetch(search_url, "/orders/_doc/2"))["found"] is False


async def test_a_rejected_document_fails_only_its_own_event(search_url: str) -> None:
    flows = SYNC_TO_ELASTIC.replace(
        'flow "sync_to_elastic" {', 'flow "sync_to_elastic" {\n concurrency = 64'
    )
    async with running(es_config(search_url, flows, "max_requests = 1")) as app:
        await app.publish("rabbit", "orders.created", {"id": 0, "total": 1})
        assert await settle(app) == []
        for i in range(1, 200):
            total: Any = "lots" if i == 50 else i
            await app.publish("rabbit", "orders.created", {"id": i, "total": total})
        reasons = await settle(app)
        requests = app.runtime.metrics.registry.get_sample_value(
            "mycel_elasticsearch_requests_total", {"connector": "es"}
        )
    assert reasons == [
        "flow 'sync_to_elastic': to 'es' failed after 1 try: index 'orders' "
        "document '50': mapper_parsing_exception: failed to parse field [total] of "
        "type [long] in document with id '50'. Preview of field's value: 'lots' "
        '(For input string: "lots")'
    ]
    assert await count(search_url, "orders") == 199
    # 200 documents, concurrently: far fewer bulk requests than documents.
    assert requests is not None and requests < 100


@pytest.mark.parametrize(
    ("target", "payload", "reason"),
    [
        (
            "Orders",
            {"id": 1},
            "'Orders' is not a valid index name (lowercase, no "
            'spaces or \\ / * ? " < > | , # :, not starting with - _ +)',
        ),
        (
            "_orders",
            {"id": 1},
            "'_orders' is not a valid index name (lowercase, no "
            'spaces or \\ / * ? " < > | , # :, not starting with - _ +)',
        ),
        ("orders", [1, 2], "index 'orders': the payload must be an object, not list"),
        (
            "orders",
            {"id": 1, "x": float("nan")},
            "index 'orders': the payload is not JSON: Out of range float values "
            "are not JSON compliant",
        ),
        (
            "orders",
            {"id": {"a": 1}},
            "the payload's 'id' gave {'a': 1}: a document "
            "id must be a string or a number",
        ),
    ],
)
async def test_bad_events_fail_permanently(
    search_url: str, target: str, payload: Any, reason: str
) -> None:
    flows = f"""
    flow "f" {{
      from {{ connector = "rabbit"  operation = "t" }}
      to   {{ connector = "es"  target = "{target}" }}
    }}
    """
    async with running(es_config(search_url, flows)) as app:
        await app.publish("rabbit", "t", payload)
        assert await settle(app) == [f"flow 'f': to 'es' failed after 1 try: {reason}"]


async def test_update_without_an_id_fails(search_url: str) -> None:
    flows = """
    flow "f" {
      from { connector = "rabbit"  operation = "t" }
      to   { connector = "es"  operation = "delete"  target = "orders" }
    }
    """
    async with running(es_config(search_url, flows)) as app:
        await app.publish("rabbit", "t", {"name": "no id"})
        assert await settle(app) == [
            "flow 'f': to 'es' failed after 1 try: index 'orders': delete needs a "
            "document id: the payload has no 'id' and the to block gives no id "
            "expression"
        ]


class FaultProxy:
    """Forwards to the search server, answering chosen statuses first."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[int] = []
        self.item_faults: list[int] = []
        self.bulk_sizes: list[int] = []
        self.bulk_queries: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.server = AsgiServer(
            Starlette(
                routes=[
                    Route(
                        "/{path:path}",
                        self.forward,
                        methods=[
                            "GET",
                            "POST",
                            "PUT",
                            "DELETE",
                            "HEAD",
                        ],
                    )
                ]
            ),
            "127.0.0.1",
            0,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def forward(self, request: Request) -> Response:
        self.headers.append(dict(request.headers))
        if request.url.path == "/_bulk" and self.faults:
            status = self.faults.pop(0)
            error = {"type": "injected", "reason": f"fault {status}"}
            return Response(
                json.dumps({"error": error, "status": status}),
                status_code=status,
                media_type="application/json",
            )
        body = await request.body()
        if request.url.path == "/_bulk":
            self.bulk_sizes.append(body.count(b'"_index"'))
            self.bulk_queries.append(request.url.query)
        async with httpx.AsyncClient() as client:
            answer = await client.request(
                request.method,
                self.upstream + request.url.path,
                params=request.query_params,
                content=body,
                headers={
                    k: v for k, v in request.headers.items() if k == "content-type"
                },
            )
        content = answer.content
        if request.url.path == "/_bulk" and self.item_faults:
            # The server took the document, but the answer says it did not:
            # the resend must be of that document alone, and harmless.
            status = self.item_faults.pop(0)
            data = answer.json()
            item = next(iter(data["items"][0].values()))
            item["status"] = status
            item["error"] = {
                "type": "es_rejected_execution_exception",
                "reason": "busy",
            }
            data["errors"] = True
            content = json.dumps(data).encode()
        return Response(content, answer.status_code, media_type="application/json")


@pytest.fixture
async def proxy(search_url: str) -> AsyncIterator[FaultProxy]:
    fault_proxy = FaultProxy(search_url)
    await fault_proxy.server.start()
    try:
        yield fault_proxy
    finally:
        await fault_proxy.server.stop()


async def test_429_and_5xx_are_resent_with_backoff(
    search_url: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.faults = [429, 503]
    extra = 'retry_delay = "10ms"\n api_key = "c2VjcmV0"'
    with caplog.at_level(logging.WARNING, "mycel.elasticsearch"):
        async with running(es_config(proxy.url, SYNC_TO_ELASTIC, extra)) as app:
            await app.publish("rabbit", "orders.created", {"id": 1, "status": "new"})
            assert await settle(app) == []
    assert (await fetch(search_url, "/orders/_doc/1"))["_source"] == {
        "id": 1,
        "status": "new",
    }
    warnings = [
        r.getMessage() for r in caplog.records if r.name == "mycel.elasticsearch"
    ]
    assert warnings == [
        "bulk: 1 of 1 documents not accepted (HTTP 429: injected: fault 429); "
        "resending in 0.01s",
        "bulk: 1 of 1 documents not accepted (HTTP 503: injected: fault 503); "
        "resending in 0.02s",
    ]
    assert {h.get("authorization") for h in proxy.headers} == {"ApiKey c2VjcmV0"}


async def test_resends_run_out_into_a_transient_flow_error(
    search_url: str, proxy: FaultProxy
) -> None:
    proxy.faults = [503] * 4
    flows = SYNC_TO_ELASTIC.replace(
        'flow "sync_to_elastic" {',
        'flow "sync_to_elastic" {\n retry {\n attempts = 2\n delay = "10ms"\n }',
    )
    extra = 'retry_delay = "10ms"\n retries = 1\n username = "u"\n password = "p"'
    async with running(es_config(proxy.url, flows, extra)) as app:
        await app.publish("rabbit", "orders.created", {"id": 1})
        assert await settle(app) == [
            "flow 'sync_to_elastic': to 'es' failed after 2 tries: index 'orders' "
            "document '1': HTTP 503: injected: fault 503"
        ]
    assert {h.get("authorization") for h in proxy.headers} == {"Basic dTpw"}


async def test_nodes_skip_one_that_cannot_be_reached(search_url: str) -> None:
    text = es_config(search_url, SYNC_TO_ELASTIC).replace(
        f'url  = "{search_url}"',
        f'nodes = ["http://127.0.0.1:1", "{search_url}"]\n retry_delay = "10ms"',
    )
    async with running(text) as app:
        for i in range(4):
            await app.publish("rabbit", "orders.created", {"id": i})
        assert await settle(app) == []
    assert await count(search_url, "orders") == 4


async def test_an_unreachable_cluster_stops_the_start() -> None:
    text = es_config("http://user:pw@127.0.0.1:1", SYNC_TO_ELASTIC)
    with pytest.raises(ConnectorError) as caught:
        async with running(text):
            pass
    assert str(caught.value).startswith(
        "elasticsearch 'es': cannot reach http://user:***@127.0.0.1:1: "
    )
    assert ":pw@" not in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            'url = "http://a"\n nodes = ["http://b"]',
            "give either url or nodes, not both",
        ),
        ('username = "u"', "basic authentication needs both username and password"),
        (
            'username = "u"\n password = "p"\n api_key = "k"',
            "give either api_key or username and password, not both",
        ),
    ],
)
def test_settings_are_checked_before_start(settings: str, message: str) -> None:
    text = f'connector "es" {{\n type = "elasticsearch"\n {settings}\n}}\n'
    with pytest.raises(ConfigError) as caught:
        load_test_config(text)
    assert message in str(caught.value)


def test_a_bad_id_expression_is_a_configuration_error() -> None:
    text = es_config(
        "http://x",
        """
    flow "f" {
      from { connector = "rabbit"  operation = "t" }
      to   { connector = "es"  target = "t"  id = "input.id +" }
    }
    """,
    )
    with pytest.raises(ConfigError) as caught:
        load_test_config(text)
    assert "flow 'f': id: " in str(caught.value)


async def test_a_document_answered_429_is_resent_alone(
    search_url: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.item_faults = [429]
    flows = SYNC_TO_ELASTIC.replace(
        'flow "sync_to_elastic" {', 'flow "sync_to_elastic" {\n concurrency = 8'
    )
    extra = 'retry_delay = "10ms"\n flush_interval = "5s"\n batch_size = 3'
    with caplog.at_level(logging.WARNING, "mycel.elasticsearch"):
        async with running(es_config(proxy.url, flows, extra)) as app:
            for i in range(3):
                await app.publish("rabbit", "orders.created", {"id": i})
            assert await settle(app) == []
    assert proxy.bulk_sizes == [3, 1]
    assert [r.getMessage() for r in caplog.records] == [
        "bulk: 1 of 3 documents not accepted (status 429: "
        "es_rejected_execution_exception: busy); resending in 0.01s"
    ]
    assert await count(search_url, "orders") == 3


async def test_flush_interval_gathers_a_partial_batch(
    search_url: str, proxy: FaultProxy
) -> None:
    flows = SYNC_TO_ELASTIC.replace(
        'flow "sync_to_elastic" {', 'flow "sync_to_elastic" {\n concurrency = 8'
    )
    extra = 'flush_interval = "300ms"\n batch_size = 100'
    async with running(es_config(proxy.url, flows, extra)) as app:
        for i in range(5):
            await app.publish("rabbit", "orders.created", {"id": i})
        assert await settle(app) == []
    assert proxy.bulk_sizes == [5]
    assert await count(search_url, "orders") == 5


async def test_sync_to_elastic_from_real_change_data_capture(
    search_url: str, pg_logical_database: str
) -> None:
    # The seed flow with the CDC connector of mycel-cdc when installed.
    try:
        import asyncpg

        import mycel_cdc  # noqa: F401
    except ImportError:
        service_unavailable("mycel-cdc, for the CDC source")
    conn = await asyncpg.connect(pg_logical_database)
    try:
        await conn.execute(
            "CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric)"
        )
        slot = f"es_{uuid.uuid4().hex[:10]}"
        text = f"""
        connector "cdc" {{
          type              = "cdc"
          driver            = "postgres"
          connection_string = "{pg_logical_database}"
          tables            = ["orders"]
          slot_name         = "{slot}"
        }}
        connector "es" {{
          type = "elasticsearch"
          url  = "{search_url}"
        }}
        flow "sync_to_elastic" {{
          from {{ connector = "cdc"  operation = "orders.*" }}
          to   {{ connector = "es"   operation = "index"  target = "orders" }}
        }}
        """
        async with running(text):
            await conn.execute("INSERT INTO orders VALUES (1, 'new', 9.5)")
            await conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
            await conn.execute("INSERT INTO orders VALUES (2, 'new', 3)")

            async def synced() -> bool:
                first = await fetch(search_url, "/orders/_doc/1")
                second = await fetch(search_url, "/orders/_doc/2")
                return bool(
                    first.get("found")
                    and first["_source"]["status"] == "paid"
                    and second.get("found")
                )

            await eventually(synced, timeout=15)
    finally:
        await conn.close()
    source = (await fetch(search_url, "/orders/_doc/1"))["_source"]
    assert {
        k: source[k] for k in ("id", "status", "total", "_operation", "_table")
    } == {
        "id": 1,
        "status": "paid",
        "total": 9.5,
        "_operation": "UPDATE",
        "_table": "orders",
    }
    assert await count(search_url, "orders") == 2


async def test_refresh_is_passed_to_the_bulk_api(
    search_url: str, proxy: FaultProxy
) -> None:
    extra = 'refresh = "wait_for"'
    async with running(es_config(proxy.url, SYNC_TO_ELASTIC, extra)) as app:
        await app.publish("rabbit", "orders.created", {"id": 1})
        assert await settle(app) == []
    assert proxy.bulk_queries == ["refresh=wait_for"]
