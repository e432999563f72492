"""Issue 12 in a real browser: a page authenticates with a query-string
token over EventSource and WebSocket (which cannot set headers) and gets
only its own user's events; a forged token gets nothing.

The page is served by the built-in ``http`` connector on another port, so
both connections are cross-origin and pass the origin checks.

"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from mycel.testing import App, eventually, free_port, running

pytestmark = pytest.mark.browser

SECRET = "browser-auth-test-secret-of-32-bytes-at-least"

PAGE = """<!doctype html>
<html><body><script>
const params = new URLSearchParams(location.search);
const token = encodeURIComponent(params.get("token"));
window.sse = [];
window.ws = [];
window.state = {sseOpen: false, sseError: false, wsOpen: false, wsClose: null};
const events = new EventSource(
  `http://127.0.0.1:${params.get("sse")}/events/orders?token=${token}&user_id=bob`);
events.onopen = () => { window.state.sseOpen = true; };
events.onerror = () => {
  window.state.sseError = true;
  events.close();
};
events.addEventListener("order", (e) => window.sse.push(JSON.parse(e.data)));
const socket = new WebSocket(
  `ws://127.0.0.1:${params.get("ws")}/ws?token=${token}&user_id=bob`);
socket.onopen = () => { window.state.wsOpen = true; };
socket.onclose = (e) => { window.state.wsClose = e.code; };
socket.onmessage = (e) => window.ws.push(JSON.parse(e.data));
</script></body></html>
"""

CONFIG = """
connector "mem" {{ type = "memory" }}
connector "web" {{
  type       = "http"
  port       = {web}
  static_dir = "{static}"
}}
connector "sse" {{
  type = "sse"
  port = {sse}
  cors {{ origins = ["http://127.0.0.1:{web}"] }}
  auth {{
    required = true
    jwt {{
      secret   = "{secret}"
      audience = "dashboard"
    }}
  }}
}}
connector "ws" {{
  type            = "websocket"
  port            = {ws}
  allowed_origins = ["http://127.0.0.1:{web}"]
  auth {{
    required = true
    jwt {{
      secret   = "{secret}"
      audience = "dashboard"
    }}
  }}
}}
flow "orders_sse" {{
  from {{ connector = "mem"  operation = "orders" }}
  to {{
    connector = "sse"
    operation = "stream:orders"
    filter    = "input.user_id == context.user.sub"
    event     = "order"
  }}
}}
flow "orders_ws" {{
  from {{ connector = "mem"  operation = "orders" }}
  to {{
    connector = "ws"
    operation = "broadcast"
    filter    = "input.user_id == context.user.sub"
  }}
}}
"""


def token(sub: str, key: str = SECRET) -> str:
    claims = {"sub": sub, "aud": "dashboard", "exp": int(time.time()) + 300}
    return jwt.encode(claims, key, algorithm="HS256")


def configure(tmp_path: Path) -> tuple[str, dict[str, int]]:
    """The page in ``tmp_path`` and a configuration serving it, with ports."""
    (tmp_path / "index.html").write_text(PAGE, encoding="utf-8")
    ports = {"web": free_port(), "sse": free_port(), "ws": free_port()}
    config = CONFIG.format(static=tmp_path, secret=SECRET, **ports)
    return config, ports


async def subscribed(app: App, connector: str) -> None:
    hub = app.connector(connector).services.hub
    await eventually(lambda: hub.topic_size(None) == 1)


async def test_page_authenticates_by_query_token_and_gets_only_its_events(
    page: Any, tmp_path: Path
) -> None:
    config, ports = configure(tmp_path)
    async with running(config) as app:
        web = f"http://127.0.0.1:{ports['web']}"
        await page.goto(
            f"{web}/index.html?sse={ports['sse']}&ws={ports['ws']}"
            f"&token={token('alice')}"
        )
        await page.wait_for_function(
            "window.state.sseOpen && window.state.wsOpen", timeout=10_000
        )
        await subscribed(app, "sse")
        await subscribed(app, "ws")
        # The page also claims ?user_id=bob; only its token counts.
        await app.publish("mem", "orders", {"user_id": "bob", "n": 1})
        await app.publish("mem", "orders", {"user_id": "alice", "n": 2})
        await page.wait_for_function(
            "window.sse.length >= 1 && window.ws.length >= 1", timeout=10_000
        )
        assert await page.evaluate("window.sse") == [{"user_id": "alice", "n": 2}]
        assert await page.evaluate("window.ws") == [
            {"type": "message", "data": {"user_id": "alice", "n": 2}}
        ]


async def test_page_with_a_forged_token_is_refused_on_both(
    page: Any, tmp_path: Path
) -> None:
    config, ports = configure(tmp_path)
    forged = token("alice", key="x" * 40)
    async with running(config) as app:
        web = f"http://127.0.0.1:{ports['web']}"
        await page.goto(
            f"{web}/index.html?sse={ports['sse']}&ws={ports['ws']}&token={forged}"
        )
        await page.wait_for_function(
            "window.state.sseError && window.state.wsClose !== null", timeout=10_000
        )
        state = await page.evaluate("window.state")
        # A browser sees a refused handshake only as an abnormal close.
        assert state == {
            "sseOpen": False,
            "sseError": True,
            "wsOpen": False,
            "wsClose": 1006,
        }
        assert app.connector("sse").services.hub.topic_size(None) == 0
        assert app.connector("ws").services.hub.topic_size(None) == 0
