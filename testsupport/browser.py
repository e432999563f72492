"""Headless Chromium (Debian's package) driven through Playwright.

Playwright's own browser download cannot run here; its Python package
drives the system Chromium at /usr/bin/chromium instead. The flags keep
Chromium off the network except for the pages a test opens on localhost.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from .base import service_unavailable

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[object]:
    """A Playwright Browser on headless Debian Chromium."""
    path = chromium_path()
    if path is None:
        service_unavailable("chromium (apt-get install chromium)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        service_unavailable("playwright (pip install playwright)")
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(
            executable_path=path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            await instance.close()


@pytest_asyncio.fixture
async def page(browser: object) -> AsyncIterator[object]:
    """A fresh page in its own browser context."""
    context = await browser.new_context()  # type: ignore[attr-defined]
    page = await context.new_page()
    try:
        yield page
    finally:
        await context.close()


__all__ = ["CHROMIUM_ARGS", "browser", "chromium_path", "page", "pytest"]
