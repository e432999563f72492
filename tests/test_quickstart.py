"""The quickstart, as a newcomer meets it: `mycel run`, then a browser.

The configuration and page are copied to a temporary folder with free ports
substituted, so the test never collides with anything else on the machine;
otherwise they are the very files ``./dev demo`` runs.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mycel.testing import free_port
from testsupport.base import ROOT

PORTS = {"8080": "http", "8081": "ws", "8082": "sse", "8083": "gql", "9090": "admin"}


@pytest.fixture
def quickstart(tmp_path: Path) -> Iterator[dict[str, int]]:
    folder = tmp_path / "quickstart"
    shutil.copytree(ROOT / "examples" / "quickstart", folder)
    ports = {name: free_port() for name in PORTS.values()}
    for path in (folder / "main.mycel", folder / "public" / "app.js"):
        text = path.read_text()
        for old, name in PORTS.items():
            text = re.sub(rf"\b{old}\b", str(ports[name]), text)
        path.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mycel", "run", str(folder)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "quickstart started" in line:
            break
    else:
        proc.wait()
        pytest.fail("the quickstart did not start:\n" + "".join(lines))
    try:
        yield ports
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()


def test_quickstart_validates() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mycel",
            "validate",
            str(ROOT / "examples" / "quickstart"),
        ],
        capture_output=True,
        text=True,
    )
    assert (result.returncode, result.stdout) == (
        0,
        "Configuration OK: 6 connectors, 5 flows.\n",
    )


@pytest.mark.browser
async def test_page_shows_posted_orders_per_user_and_chat(
    quickstart: dict[str, int], page: object
) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    base = f"http://127.0.0.1:{quickstart['http']}"
    await page.goto(f"{base}/?user=1")
    await expect(page.locator("#chat-status")).to_have_text("in room lobby")
    await expect(page.locator("#feed-status")).to_have_text(
        "subscribed to stream orders"
    )
    await expect(page.locator("#gql-status")).to_have_text("subscribed to orderUpdated")

    # Another user's order first: it must not show up on user 1's page.
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{base}/orders",
            json={"id": "x2", "user_id": 2, "item": "not yours", "status": "created"},
        )
    assert response.status_code == 202

    # Post through the page's own form.
    await page.fill("#order-item", "green tea")
    await page.select_option("#order-status", "shipped")
    await page.click("#order-send")
    await expect(page.locator("#order-result")).to_contain_text("202: order")
    await expect(page.locator("#feed-log li")).to_have_count(1)
    await expect(page.locator("#feed-log li").first).to_contain_text(
        "green tea (shipped)"
    )
    await expect(page.locator("#gql-log li")).to_have_count(1)
    await expect(page.locator("#gql-log li").first).to_contain_text(
        "green tea (shipped)"
    )

    # A later order of user 1 arrives; user 2's, posted before it, never.
    async with httpx.AsyncClient() as client:
        await client.post(
            f"{base}/orders",
            json={"id": "x3", "user_id": 1, "item": "mugs", "status": "created"},
        )
    await expect(page.locator("#feed-log li")).to_have_count(2)
    await expect(page.locator("#feed-log")).not_to_contain_text("not yours")
    await expect(page.locator("#gql-log li")).to_have_count(2)
    await expect(page.locator("#gql-log")).not_to_contain_text("not yours")

    # Chat goes round the room and back.
    await page.fill("#chat-text", "hello room")
    await page.press("#chat-text", "Enter")
    await expect(page.locator("#chat-log li").first).to_have_text("user 1: hello room")
