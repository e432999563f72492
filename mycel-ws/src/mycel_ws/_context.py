"""The ``context`` of a connection, as filters and source flows see it.

Everything that decides what a connection *is* to flows lives in
:func:`connection_context`: the client's query parameters as
``context.params`` and, with an ``auth`` block, the verified JWT claims as
``context.user``, which no parameter can change.

"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import mycel

__all__ = ["connection_context", "query_params"]


def query_params(request_path: str) -> dict[str, str]:
    """The handshake's query parameters; a repeated name keeps its last value.

    >>> query_params("/ws?user_id=7&rooms=a,b")
    {'user_id': '7', 'rooms': 'a,b'}

    """
    query = urlsplit(request_path).query
    return dict(parse_qsl(query, keep_blank_values=True))


def connection_context(
    connection_id: str,
    params: Mapping[str, str],
    identity: mycel.Identity | None = None,
    auth: mycel.Authenticator | None = None,
) -> dict[str, Any]:
    """``context`` of one connection: ``{"params": {...}, "id": "..."}``,
    plus ``"user"`` (verified claims) for an authenticated ``identity``.

    ``params`` are claims the client makes about itself, never verified;
    with ``auth``, the token's query parameter is left out of them.

    """
    extra = {"id": connection_id}
    if auth is not None:
        return auth.build_context(params, identity, extra)
    return mycel.build_context(params, identity, extra)
