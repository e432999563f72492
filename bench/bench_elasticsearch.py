"""Elasticsearch target: documents/s through a flow vs the client's bulk helper.

The same 5,000 order documents go into an empty index of a real search
server (osmem-server, which speaks the Elasticsearch/OpenSearch API) twice:
once through Mycel (a memory source, the flow engine, the elasticsearch
target batching concurrent deliveries into bulk requests, each delivery
awaiting its own document's result) and once with opensearch-py's
``helpers.async_bulk`` (chunks of 500, the client's default), the usual way
a Python program bulk-indexes. The official ``elasticsearch`` client cannot
be the baseline: its compatibility headers are refused (406) by
OpenSearch-compatible servers. Each run gets a fresh clone of the server;
best of three. The issue's aim: Mycel at least 0.8 of the helper.

Needs ``osmem-server`` and ``opensearch-py[async]``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from opensearchpy import AsyncOpenSearch
from opensearchpy.helpers import async_bulk
from osmem_server import OsmemServer

from mycel.testing import running

DOCS = 5_000
REPEAT = 3

CONFIG = """
connector "rabbit" {{ type = "memory"  buffer = 50000 }}
connector "es" {{
  type = "elasticsearch"
  url  = "{url}"
}}
flow "sync_to_elastic" {{
  concurrency = 2048
  from {{ connector = "rabbit"  operation = "orders.*" }}
  to   {{ connector = "es"      operation = "index"  target = "orders" }}
}}
"""


def documents() -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "status": "paid" if i % 3 else "new",
            "total": i * 1.5,
            "customer": {"id": i % 977, "country": "DE"},
        }
        for i in range(DOCS)
    ]


async def indexed(url: str) -> int:
    async with httpx.AsyncClient() as client:
        await client.post(f"{url}/orders/_refresh")
        response = await client.get(f"{url}/orders/_count")
        return int(response.json()["count"])


async def helper(url: str, docs: list[dict[str, Any]]) -> float:
    client = AsyncOpenSearch(hosts=[url], timeout=120)
    try:
        actions = (
            {"_index": "orders", "_id": str(doc["id"]), "_source": doc} for doc in docs
        )
        start = time.perf_counter()
        ok, errors = await async_bulk(client, actions, chunk_size=500)
        elapsed = time.perf_counter() - start
        assert ok == DOCS and not errors, errors
    finally:
        await client.close()
    assert await indexed(url) == DOCS
    return DOCS / elapsed


async def through_mycel(url: str, docs: list[dict[str, Any]]) -> float:
    async with running(CONFIG.format(url=url)) as app:
        source = app.memory("rabbit")
        start = time.perf_counter()
        for doc in docs:
            await source.publish("orders.created", doc)
        await source.drain()
        elapsed = time.perf_counter() - start
        assert not source.dead_letters, list(source.dead_letters)[:3]
    assert await indexed(url) == DOCS
    return DOCS / elapsed


async def main() -> None:
    server = OsmemServer.start(japanese=False)
    try:
        docs = documents()
        mycel_best = helper_best = 0.0
        for _ in range(REPEAT):
            with server.clone() as clone:
                helper_best = max(helper_best, await helper(clone.url, docs))
            with server.clone() as clone:
                mycel_best = max(mycel_best, await through_mycel(clone.url, docs))
    finally:
        server.close()
    print(
        json.dumps(
            {
                "bench": "elasticsearch",
                "figure": "documents into a search server",
                "unit": "docs/s",
                "value": round(mycel_best),
                "baseline_name": "opensearch-py helpers.async_bulk",
                "baseline": round(helper_best),
                "ratio": round(mycel_best / helper_best, 2),
                "higher_is_better": True,
                "aim": ">= 0.8",
                "notes": (
                    f"{DOCS:,} documents into osmem-server, best of {REPEAT}; "
                    "Mycel: memory source, flow concurrency 2048, batch_size 500, "
                    "max_requests 4, every delivery awaits its document's result"
                ),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
