"""Reading HCL files into plain blocks that remember where they came from.

python-hcl2 8 turns a file into dictionaries whose values are HCL source
text and that keep only the last of two attributes with the same name. We
need neither: we walk its lark parse tree instead, which gives every
attribute and block its line, lets us see duplicates, and keeps the text of
string values exactly as written. ``${...}`` inside a string is *not*
evaluated here: in Mycel it is a CEL template evaluated per event.

Supported values: strings (quoted and heredoc), numbers, booleans, null,
lists, objects, negative numbers, and the ``env("NAME")`` /
``env("NAME", "default")`` function, resolved when the file is read.

"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
from lark import Token, Tree
from lark.exceptions import UnexpectedInput

from .errors import Problem

__all__ = ["Attribute", "Block", "read_directory", "read_text"]


@dataclass
class Attribute:
    """``name = value`` with its place in the source."""

    name: str
    value: Any
    file: str
    line: int


@dataclass
class Block:
    """``type "label" { ... }`` with its attributes and nested blocks."""

    type: str
    labels: list[str]
    file: str
    line: int
    attributes: dict[str, Attribute] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)
    invalid: set[str] = field(default_factory=set)
    """Attributes whose value could not be read (already reported)."""

    def blocks_of(self, type_: str) -> list[Block]:
        return [block for block in self.blocks if block.type == type_]

    def to_dict(self) -> dict[str, Any]:
        """Attributes and nested blocks as plain values, for pydantic.

        A nested block becomes a dictionary under its type; a block type that
        appears more than once becomes a list of them.

        """
        result: dict[str, Any] = {
            name: attr.value for name, attr in self.attributes.items()
        }
        for block in self.blocks:
            value = block.to_dict()
            if block.type in result:
                previous = result[block.type]
                if isinstance(previous, list):
                    previous.append(value)
                else:
                    result[block.type] = [previous, value]
            else:
                result[block.type] = value
        return result

    def line_of(self, path: tuple[str | int, ...]) -> int:
        """Line of the attribute or block that ``path`` names, best effort."""
        if not path:
            return self.line
        head = path[0]
        if isinstance(head, str):
            if head in self.attributes:
                return self.attributes[head].line
            nested = self.blocks_of(head)
            if nested:
                rest = path[1:]
                if rest and isinstance(rest[0], int) and rest[0] < len(nested):
                    return nested[rest[0]].line_of(rest[1:])
                return nested[0].line_of(rest)
        return self.line


class _Unsupported(Exception):
    """A value we do not evaluate; carries the line for the problem."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))|%%\{")


# Templates are CEL, not HCL: before parsing, every ``${`` (and every
# literal ``$${``) is parked on a private-use character so that the HCL
# parser never looks inside a template (CEL allows single quotes and
# unbalanced braces in strings, HCL's lexer does not). _unescape restores
# them.
_LITERAL = "\ue000"
_TEMPLATE = "\ue001"


def _protect_templates(text: str) -> str:
    return text.replace("$${", _LITERAL).replace("${", _TEMPLATE)


def _unescape(raw: str) -> str:
    """Undo HCL string escapes, keeping ``${...}`` templates verbatim."""

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "%%{":
            return "%{"
        if match.group(1) or match.group(2):
            return chr(int(match.group(1) or match.group(2), 16))
        return _ESCAPES.get(match.group(3), text)

    restored = raw.replace(_TEMPLATE, "${").replace(_LITERAL, "$${")
    return _ESCAPE.sub(replace, restored)


class _Reader:
    """Turns one file's parse tree into blocks and collects problems."""

    def __init__(self, text: str, file: str, environ: Mapping[str, str]) -> None:
        self.text = text
        self.file = file
        self.environ = environ
        self.problems: list[Problem] = []

    def body(self, tree: Tree[Any], into: Block) -> None:
        for child in tree.children:
            if not isinstance(child, Tree):
                continue
            if child.data == "attribute":
                self.attribute(child, into)
            elif child.data == "block":
                into.blocks.append(self.block(child))

    def attribute(self, tree: Tree[Any], into: Block) -> None:
        name = self.identifier(tree.children[0])
        line = tree.meta.line
        if name in into.attributes:
            first = into.attributes[name].line
            self.problems.append(
                Problem(
                    self.file,
                    line,
                    f"duplicate attribute {name!r} (first set on line {first})",
                    "Keep one of them.",
                )
            )
            return
        try:
            value = self.value(tree.children[-1])
        except _Unsupported as exc:
            # Reported here; leaving the attribute out keeps the settings
            # check from reporting it a second time.
            self.problems.append(Problem(self.file, exc.line, str(exc)))
            into.invalid.add(name)
            return
        into.attributes[name] = Attribute(name, value, self.file, line)

    def block(self, tree: Tree[Any]) -> Block:
        type_ = self.identifier(tree.children[0])
        labels: list[str] = []
        block = Block(type_, labels, self.file, tree.meta.line)
        for child in tree.children[1:]:
            if isinstance(child, Tree) and child.data == "string":
                labels.append(self.string(child))
            elif isinstance(child, Tree) and child.data == "identifier":
                labels.append(self.identifier(child))
            elif isinstance(child, Tree) and child.data == "body":
                self.body(child, block)
        return block

    @staticmethod
    def identifier(tree: Tree[Any] | Token) -> str:
        if isinstance(tree, Token):
            return str(tree)
        return str(tree.children[0])

    def string(self, tree: Tree[Any]) -> str:
        # The raw text between the quotes, so templates stay as written.
        raw = self.text[tree.meta.start_pos + 1 : tree.meta.end_pos - 1]
        return _unescape(raw)

    def value(self, node: Tree[Any] | Token) -> Any:
        if isinstance(node, Token):
            raise _Unsupported(f"unsupported value {str(node)!r}", node.line or 0)
        kind = node.data
        if kind == "expr_term":
            inner = [c for c in node.children if isinstance(c, Tree | Token)]
            meaningful = [c for c in inner if not (isinstance(c, Token) and c in "()")]
            if len(meaningful) == 1:
                return self.value(meaningful[0])
        elif kind == "string":
            return self.string(node)
        elif kind == "int_lit":
            return int(str(node.children[0]))
        elif kind == "float_lit":
            return float(str(node.children[0]))
        elif kind == "literal_value":
            word = str(node.children[0])
            return {"true": True, "false": False, "null": None}[word]
        elif kind in {"heredoc_template", "heredoc_template_trim"}:
            return self.heredoc(str(node.children[0]), trim=kind.endswith("trim"))
        elif kind == "tuple":
            return [self.value(c) for c in node.children if isinstance(c, Tree)]
        elif kind == "object":
            return self.object(node)
        elif kind == "unary_op" and str(node.children[0]) == "-":
            operand = self.value(node.children[1])
            if isinstance(operand, int | float) and not isinstance(operand, bool):
                return -operand
        elif kind == "function_call":
            return self.call(node)
        elif kind == "identifier":
            name = str(node.children[0])
            raise _Unsupported(
                f'bare word {name!r} is not a value; quote it: "{name}"',
                node.meta.line,
            )
        line = node.meta.line if not node.meta.empty else 0
        source = self.text[node.meta.start_pos : node.meta.end_pos] if line else kind
        raise _Unsupported(
            f"unsupported expression {source!r}: use a literal or env()", line
        )

    def object(self, node: Tree[Any]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for elem in node.children:
            if not isinstance(elem, Tree) or elem.data != "object_elem":
                continue
            key_node = elem.children[0]
            key_term = key_node.children[0] if isinstance(key_node, Tree) else key_node
            key_value = key_term.children[0] if isinstance(key_term, Tree) else key_term
            if isinstance(key_value, Tree) and key_value.data == "identifier":
                key = self.identifier(key_value)
            else:
                key = str(self.value(key_value))
            result[key] = self.value(elem.children[-1])
        return result

    def call(self, node: Tree[Any]) -> Any:
        name = self.identifier(node.children[0])
        line = node.meta.line
        args: list[Any] = []
        for child in node.children[1:]:
            if isinstance(child, Tree) and child.data == "arguments":
                args = [self.value(c) for c in child.children if isinstance(c, Tree)]
        if name != "env":
            raise _Unsupported(
                f"unknown function {name!r}; only env() is available", line
            )
        if not 1 <= len(args) <= 2 or not all(isinstance(a, str) for a in args):
            raise _Unsupported(
                "env() takes a variable name and an optional default: "
                'env("NAME") or env("NAME", "default")',
                line,
            )
        if args[0] in self.environ:
            return self.environ[args[0]]
        if len(args) == 2:
            return args[1]
        raise _Unsupported(
            f"environment variable {args[0]!r} is not set and has no default; "
            f'set it, or write env({args[0]!r}, "default")',
            line,
        )

    @staticmethod
    def heredoc(text: str, *, trim: bool) -> str:
        lines = text.rstrip("\n").split("\n")
        body = lines[1:-1]
        if trim:
            indents = [len(ln) - len(ln.lstrip()) for ln in body if ln.strip()]
            cut = min(indents, default=0)
            body = [ln[cut:] for ln in body]
        return "\n".join(body) + ("\n" if body else "")


def read_text(
    text: str, file: str, environ: Mapping[str, str] | None = None
) -> tuple[Block, list[Problem]]:
    """Read one file's text into a root block, with the problems found."""
    root = Block("<root>", [], file, 1)
    text = _protect_templates(text)
    try:
        tree = hcl2.parses_to_tree(text)
    except UnexpectedInput as exc:
        token = getattr(exc, "token", None)
        found = f" near {str(token)!r}" if token is not None and str(token) else ""
        problem = Problem(
            file,
            exc.line if exc.line > 0 else 1,
            f"syntax error at column {exc.column}{found}",
            "Check for a missing quote, brace or '='.",
        )
        return root, [problem]
    reader = _Reader(text, file, os.environ if environ is None else environ)
    body = tree.children[0] if tree.children else None
    if isinstance(body, Tree):
        reader.body(body, root)
    return root, reader.problems


def read_directory(
    directory: Path, environ: Mapping[str, str] | None = None
) -> tuple[list[Block], list[Problem]]:
    """Read every ``*.mycel`` and ``*.hcl`` file below ``directory``.

    Returns the top-level blocks of all files, in file-name order, and every
    problem found while reading them. Attributes at the top level of a file
    are reported: Mycel only knows blocks there.

    """
    files = sorted(
        path
        for pattern in ("*.mycel", "*.hcl")
        for path in directory.rglob(pattern)
        if path.is_file()
    )
    blocks: list[Block] = []
    problems: list[Problem] = []
    for path in files:
        shown = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(shown, 1, f"cannot read the file: {exc}"))
            continue
        root, found = read_text(text, shown, environ)
        problems += found
        for attr in root.attributes.values():
            problems.append(
                Problem(
                    shown,
                    attr.line,
                    f"attribute {attr.name!r} outside any block",
                    "Put it inside a connector, flow or service block.",
                )
            )
        blocks += root.blocks
    return blocks, problems
