"""A real search server for the Elasticsearch target's tests.

No Elasticsearch can be installed from the registries this project reaches,
so the tests run against ``osmem-server`` (PyPI): a real server process, in
memory, that speaks the Elasticsearch/OpenSearch REST API (``_bulk``,
``_doc``, ``_search``, ``_count``, ``_refresh``, mappings). One process
serves the whole session; every test gets a clone of its own (its own port,
copy-on-write), so tests never see each other's indices.

"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from testsupport.base import service_unavailable


@pytest.fixture(scope="session")
def search_server() -> Iterator[Any]:
    """The session's osmem-server process (an ``OsmemServer``)."""
    try:
        from osmem_server import OsmemError, OsmemServer
    except ImportError:
        service_unavailable("osmem-server (pip install osmem-server)")
    try:
        server = OsmemServer.start(japanese=False)
    except OsmemError as exc:
        service_unavailable(f"the search server osmem-server ({exc})")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def search_url(search_server: Any) -> Iterator[str]:
    """The URL of an empty search cluster for this test only."""
    clone = search_server.clone()
    try:
        yield clone.url.rstrip("/")
    finally:
        clone.close()
