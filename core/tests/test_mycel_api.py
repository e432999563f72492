"""The public API: what ``mycel`` exports is what ``__all__`` says."""

from __future__ import annotations

import mycel


def test_all_is_sorted_and_complete() -> None:
    assert mycel.__all__ == sorted(mycel.__all__)
    # Every public name bound in the package, modules excepted.
    public = {
        name
        for name, value in vars(mycel).items()
        if not name.startswith("_")
        and not isinstance(value, type(mycel))
        and name not in {"annotations"}
    }
    assert public == set(mycel.__all__)


def test_every_exported_name_exists() -> None:
    for name in mycel.__all__:
        assert hasattr(mycel, name), name
