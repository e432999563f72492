"""The ``context`` of a connection, as filters and source flows see it.

Everything that decides what a connection *is* to flows lives in
:func:`connection_context`, so that an ``auth`` block (verified JWT claims
as ``context.user``) can be added in one place.

"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["connection_context", "query_params"]


def query_params(request_path: str) -> dict[str, str]:
    """The handshake's query parameters; a repeated name keeps its last value.

    >>> query_params("/ws?user_id=7&rooms=a,b")
    {'user_id': '7', 'rooms': 'a,b'}

    """
    query = urlsplit(request_path).query
    return dict(parse_qsl(query, keep_blank_values=True))


def connection_context(connection_id: str, params: Mapping[str, str]) -> dict[str, Any]:
    """``context`` of one connection: ``{"params": {...}, "id": "..."}``.

    ``params`` are claims the client makes about itself, never verified.

    """
    return {"params": dict(params), "id": connection_id}
