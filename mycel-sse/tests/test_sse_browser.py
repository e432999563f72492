"""A real browser's EventSource against the sse connector (headless Chromium).

The page is served by the built-in ``http`` connector on another port, so
the stream is cross-origin and goes through CORS, as it would from an app.

"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mycel.testing import free_port, running, write_config

pytestmark = pytest.mark.browser

PAGE = """<!doctype html>
<html><body><script>
const source = new URLSearchParams(location.search).get("src");
window.received = [];
window.opens = 0;
const events = new EventSource(source);
events.onopen = () => { window.opens += 1; };
events.addEventListener("order", (e) => {
  window.received.push({id: e.lastEventId, data: JSON.parse(e.data)});
});
events.addEventListener("gap", (e) => {
  window.received.push({gap: JSON.parse(e.data)});
});
</script></body></html>
"""

CONFIG = """
connector "mem" { type = "memory" }
connector "web" {
  type       = "http"
  port       = %(web)d
  static_dir = "static"
}
connector "sse" {
  type  = "sse"
  port  = %(sse)d
  retry = "500ms"
  cors { origins = ["http://127.0.0.1:%(web)d"] }
}
flow "push_order_update" {
  from { connector = "mem"  operation = "order.updated" }
  to {
    connector = "sse"
    operation = "stream:orders"
    filter    = "input.user_id == context.params.user_id"
    event     = "order"
  }
}
"""


async def wait_for_count(page: Any, name: str, count: int) -> None:
    await page.wait_for_function(f"window.{name}.length >= {count}", timeout=10_000)


async def test_event_source_gets_filtered_events_and_replay_after_drop(
    page: Any, tmp_path: Path
) -> None:
    web, sse = free_port(), free_port()
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "index.html").write_text(PAGE, encoding="utf-8")
    write_config(CONFIG % {"web": web, "sse": sse}, tmp_path)

    async with running(tmp_path) as app:
        hub = app.connector("sse").services.hub
        epoch = app.connector("sse").epoch
        source = f"http://127.0.0.1:{sse}/events/orders?user_id=7"
        await page.goto(f"http://127.0.0.1:{web}/index.html?src={source}")
        await page.wait_for_function("window.opens === 1", timeout=10_000)

        # Live: only user 7's event reaches this page.
        await app.publish("mem", "order.updated", {"user_id": 8, "order": "a"})
        await app.publish("mem", "order.updated", {"user_id": 7, "order": "b"})
        await wait_for_count(page, "received", 1)

        # The server drops the connection; events published while the page
        # is away must reach it when it comes back by itself.
        [subscriber] = hub.subscribers
        subscriber.close("dropped by the test")
        await app.publish("mem", "order.updated", {"user_id": 7, "order": "c"})
        await app.publish("mem", "order.updated", {"user_id": 9, "order": "d"})
        await app.publish("mem", "order.updated", {"user_id": 7, "order": "e"})
        await app.memory("mem").drain()
        assert hub.subscribers == []

        await wait_for_count(page, "received", 3)
        await app.publish("mem", "order.updated", {"user_id": 7, "order": "f"})
        await wait_for_count(page, "received", 4)
        received = await page.evaluate("window.received")
        opens = await page.evaluate("window.opens")

    assert received == [
        {"id": f"{epoch}-2", "data": {"user_id": 7, "order": "b"}},
        {"id": f"{epoch}-3", "data": {"user_id": 7, "order": "c"}},
        {"id": f"{epoch}-5", "data": {"user_id": 7, "order": "e"}},
        {"id": f"{epoch}-6", "data": {"user_id": 7, "order": "f"}},
    ]
    assert opens == 2
