"""The reference pages are generated from the code and must match it."""

from __future__ import annotations

import importlib.util
import re

from testsupport.base import ROOT


def load_generator() -> object:
    spec = importlib.util.spec_from_file_location(
        "generate", ROOT / "docs" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_pages_match_the_code() -> None:
    generator = load_generator()
    expected = generator.pages()  # type: ignore[attr-defined]
    folder = ROOT / "docs" / "reference"
    stale = [
        name
        for name, text in expected.items()
        if not (folder / name).exists() or (folder / name).read_text() != text
    ]
    extra = sorted(p.name for p in folder.glob("*.md") if p.name not in expected)
    assert (stale, extra) == ([], []), (
        "docs/reference is out of date: run .venv/bin/python docs/generate.py"
    )


def test_every_connector_type_of_the_repository_has_a_page() -> None:
    pages = {p.stem for p in (ROOT / "docs" / "reference").glob("*.md")}
    assert {
        "cdc",
        "database",
        "elasticsearch",
        "graphql",
        "http",
        "memory",
        "rabbitmq",
        "redis",
        "sse",
        "websocket",
    } <= pages


def test_documentation_links_resolve() -> None:
    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
