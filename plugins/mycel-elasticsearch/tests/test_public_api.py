"""What ``mycel_elasticsearch`` exports, and the index name rules."""

from __future__ import annotations

import pytest

import mycel_elasticsearch
from mycel_elasticsearch._connector import check_index


def test_all_is_sorted_and_complete() -> None:
    assert mycel_elasticsearch.__all__ == sorted(mycel_elasticsearch.__all__)
    public = {
        name
        for name, value in vars(mycel_elasticsearch).items()
        if not name.startswith("_")
        and not isinstance(value, type(mycel_elasticsearch))
        and name != "annotations"
    }
    assert public == set(mycel_elasticsearch.__all__)


@pytest.mark.parametrize("name", ["orders", "orders-2026.12", "a_b", "9x", ".kibana"])
def test_valid_index_names(name: str) -> None:
    assert check_index(name) is None


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "Orders", "-x", "_x", "+x", "a b", "a/b", "a*", "a,b", "a:b"],
)
def test_invalid_index_names(name: str) -> None:
    assert check_index(name) == (
        f"{name!r} is not a valid index name (lowercase, no spaces or "
        '\\ / * ? " < > | , # :, not starting with - _ +)'
    )


def test_long_index_names_are_refused() -> None:
    assert (
        check_index("x" * 256) == f"index name {'x' * 256!r} is longer than 255 bytes"
    )
