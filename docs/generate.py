"""Write docs/reference/<type>.md for every installed connector type.

The pages come from the connector classes themselves (settings models,
operations, from/to options, docstrings), so they cannot drift from the
code: tests/test_docs.py fails when a page differs from what this script
would write. Run it after changing a settings model:

    .venv/bin/python docs/generate.py
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mycel import Connector, load_plugins
from mycel._cluster import ClusterSettings
from mycel._config import RetrySettings, ServiceSettings

HERE = Path(__file__).resolve().parent
OUT = HERE / "reference"


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0]) if args[0] is not float else "duration"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None)) + (
            " (optional)" if type(None) in args else ""
        )
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, set, typing.Sequence):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "map"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "block"
        return {
            "str": "string",
            "int": "integer",
            "float": "number",
            "bool": "bool",
            "SecretStr": "secret string",
        }.get(annotation.__name__, annotation.__name__)
    return str(annotation)


def is_duration(info: Any) -> bool:
    return any(
        getattr(m, "func", None) is not None and m.func.__name__ == "parse_duration"
        for m in info.metadata
    )


def default_text(info: Any) -> str:
    if info.is_required():
        return "required"
    default = info.default
    if default is PydanticUndefined:
        default = info.default_factory() if info.default_factory else None
    if isinstance(default, BaseModel):
        return "see below"
    if default is None:
        return "none"
    return f"`{default!r}`".replace("'", '"')


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += [m for m in nested_models(arg) if m not in found]
    return found


def model_table(model: type[BaseModel], title: str, level: str = "##") -> list[str]:
    lines = [f"{level} {title}", ""]
    doc = inspect.getdoc(model)
    if doc and not doc.startswith(("Usage docs", "A base class")):
        lines += [doc, ""]
    fields = model.model_fields
    if not fields:
        return [*lines, "No settings.", ""]
    lines += ["| Setting | Type | Default | Meaning |", "|---|---|---|---|"]
    children = []
    for name, info in fields.items():
        kind = "duration" if is_duration(info) else type_name(info.annotation)
        text = (info.description or "").replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {default_text(info)} | {text} |")
        children += [(name, m) for m in nested_models(info.annotation)]
    lines.append("")
    for name, child in children:
        lines += model_table(child, f"`{name} {{ ... }}` block", level + "#")
    return lines


def page(cls: type[Connector], distribution: str) -> str:
    lines = [
        f'# `type = "{cls.type_name}"`',
        "",
        f"Provided by the `{distribution}` distribution. This page is generated "
        "from the code by `docs/generate.py`; do not edit it by hand.",
        "",
    ]
    module_doc = inspect.getdoc(sys.modules[cls.__module__])
    if module_doc:
        lines += [module_doc, ""]
    lines += model_table(cls.settings_model, "Settings")
    for role, ops in (
        ("Source", cls.source_operations),
        ("Target", cls.target_operations),
    ):
        if ops:
            lines += [
                f"## {role} operations",
                "",
                "| Operation | Meaning |",
                "|---|---|",
            ]
            lines += [f"| `{op.pattern}` | {op.description} |" for op in ops]
            lines.append("")
    if cls.target_operations:
        lines += [
            f"Default target operation: `{cls.default_operation}`."
            if cls.default_operation
            else "A `to` block must name its operation.",
            "A `to` block needs `target`." if cls.target_required else "",
            "Filters are evaluated per subscriber." if cls.fan_out else "",
            "",
        ]
    if cls.from_options:
        lines += model_table(cls.from_options, "Extra attributes of `from` blocks")
    if cls.to_options:
        lines += model_table(cls.to_options, "Extra attributes of `to` blocks")
    return "\n".join(line for line in lines).rstrip() + "\n"


def pages() -> dict[str, str]:
    registry = load_plugins()
    out = {}
    for type_, cls in sorted(registry.connector_types.items()):
        out[f"{type_}.md"] = page(cls, registry.type_plugin[type_].distribution)
    blocks = ["# Top-level blocks", "", "Generated by `docs/generate.py`.", ""]
    blocks += model_table(ServiceSettings, "`service { ... }`")
    blocks += model_table(ClusterSettings, "`cluster { ... }`")
    blocks += model_table(RetrySettings, "`retry { ... }` inside a flow")
    out["blocks.md"] = "\n".join(blocks).rstrip() + "\n"
    index = [
        "# Reference",
        "",
        "Generated by `docs/generate.py`.",
        "",
        "- [Top-level blocks](blocks.md)",
    ]
    index += [
        f"- [`{name[:-3]}`]({name})" for name in sorted(out) if name != "blocks.md"
    ]
    out["README.md"] = "\n".join(index) + "\n"
    return out


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, text in pages().items():
        (OUT / name).write_text(text, encoding="utf-8")
        print(f"wrote docs/reference/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
