"""A page's WebSocket in headless Chromium joins a room, gets its messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mycel.testing import free_port, running

PAGE = """<!doctype html>
<title>mycel-ws</title>
<script>
window.frames_seen = [];
const params = new URLSearchParams(location.search);
const ws = new WebSocket(
  `ws://127.0.0.1:${params.get("ws")}/ws?user_id=${params.get("user")}`);
ws.onopen = () => ws.send(JSON.stringify({type: "join_room", room: "alerts"}));
ws.onmessage = (event) => window.frames_seen.push(JSON.parse(event.data));
</script>
"""


@pytest.mark.browser
async def test_page_joins_a_room_and_gets_only_its_filtered_messages(
    page: Any, tmp_path: Path
) -> None:
    (tmp_path / "index.html").write_text(PAGE, encoding="utf-8")
    http_port, ws_port = free_port(), free_port()
    origin = f"http://127.0.0.1:{http_port}"
    config = f"""
    connector "mem" {{ type = "memory" }}
    connector "web" {{
      type = "http"
      port = {http_port}
      static_dir = "{tmp_path}"
    }}
    connector "ws" {{
      type = "websocket"
      port = {ws_port}
      allowed_origins = ["{origin}"]
    }}
    flow "alerts" {{
      from {{ connector = "mem"  operation = "alerts" }}
      to {{
        connector = "ws"
        operation = "room:alerts"
        filter    = "input.user_id == context.params.user_id"
      }}
    }}
    """
    async with running(config) as app:
        await page.goto(f"{origin}/index.html?ws={ws_port}&user=42")
        await page.wait_for_function("window.frames_seen.length === 1")
        assert await page.evaluate("window.frames_seen") == [
            {"type": "joined", "room": "alerts"}
        ]

        await app.publish("mem", "alerts", {"user_id": 41, "text": "not yours"})
        await app.publish("mem", "alerts", {"user_id": 42, "text": "yours"})
        await page.wait_for_function("window.frames_seen.length === 2")
        assert await page.evaluate("window.frames_seen[1]") == {
            "type": "message",
            "room": "alerts",
            "data": {"user_id": 42, "text": "yours"},
        }
