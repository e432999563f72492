"""Loading and checking a configuration directory.

:func:`load_config` reads every file, checks every connector against its
type's settings model and every flow against its connectors, compiles every
expression, and either returns a :class:`Config` or raises one
:class:`~mycel.errors.ConfigError` with *all* the problems found, each with
its file and line. Nothing has started at that point.

"""

from __future__ import annotations

import builtins
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from ._cluster import ClusterSettings
from ._connector import Connector, Filter, Operation
from ._expr import Expression, IndexedEquality, Template
from ._hcl import Block, read_directory, read_text
from ._plugins import KNOWN_TYPES, PluginRegistry
from ._settings import Duration, Settings, shown_value
from .errors import ConfigError, ExpressionError, Problem

__all__ = [
    "Config",
    "ConnectorConfig",
    "FlowConfig",
    "FromConfig",
    "RetrySettings",
    "ServiceSettings",
    "ToConfig",
    "load_config",
    "load_config_text",
]


class ServiceSettings(Settings):
    """The optional ``service { ... }`` block."""

    name: str = "mycel"
    """Name of this service, shown in logs and on the admin endpoint."""

    admin_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the admin endpoint (/health, /ready, /metrics); none if unset."""

    admin_host: str = "127.0.0.1"
    """Address the admin endpoint listens on."""

    shutdown_timeout: Duration = 30.0
    """How long a shutdown waits for in-flight events before giving up."""


class RetrySettings(Settings):
    """A flow's ``retry { ... }`` block."""

    attempts: int = Field(default=3, ge=1)
    """Tries of each ``to`` block per event, the first one included."""

    delay: Duration = 0.2
    """Wait before the second try; doubles for each further try."""

    max_delay: Duration = 10.0
    """Longest wait between two tries."""


class _FlowSettings(Settings):
    concurrency: int = Field(default=64, ge=1)
    """Events of this flow processed at the same time (unordered sources)."""


@dataclass
class ConnectorConfig:
    name: str
    type: str
    cls: builtins.type[Connector]
    settings: Settings
    file: str
    line: int


@dataclass
class FromConfig:
    connector: str
    operation: str
    options: Settings | None
    file: str
    line: int


@dataclass
class ToConfig:
    connector: str
    operation: Template
    target: Template | None
    filter: Filter | None
    options: Settings | None
    fan_out: bool
    file: str
    line: int


@dataclass
class FlowConfig:
    name: str
    source: FromConfig
    transform: list[tuple[str, Expression]]
    to: list[ToConfig]
    retry: RetrySettings
    concurrency: int
    file: str
    line: int


@dataclass
class Config:
    """A checked configuration, ready for :class:`mycel.Runtime`."""

    service: ServiceSettings
    connectors: dict[str, ConnectorConfig] = field(default_factory=dict)
    flows: dict[str, FlowConfig] = field(default_factory=dict)
    registry: PluginRegistry = field(default_factory=PluginRegistry)
    base_dir: Path = field(default_factory=Path.cwd)
    cluster: ClusterSettings | None = None


_TOP_LEVEL = ("cluster", "connector", "flow", "service")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"Did you mean {close[0]!r}?" if close else ""


class _Checker:
    def __init__(self, registry: PluginRegistry) -> None:
        self.registry = registry
        self.problems: list[Problem] = []
        self.broken_connectors: set[str] = set()
        self.connectors_seen: dict[str, Block] = {}
        self.flows_seen: dict[str, Block] = {}

    def problem(self, where: Block, line: int, message: str, hint: str = "") -> None:
        self.problems.append(Problem(where.file, line, message, hint))

    # Settings models

    def settings(
        self,
        model: type[Settings],
        data: Mapping[str, Any],
        block: Block,
        what: str,
    ) -> Settings | None:
        try:
            return model.model_validate(dict(data))
        except ValidationError as exc:
            for error in exc.errors():
                self.settings_error(model, error, block, what)
            return None

    def settings_error(
        self, model: type[Settings], error: Any, block: Block, what: str
    ) -> None:
        loc = tuple(error["loc"])
        name = ".".join(str(part) for part in loc)
        line = block.line_of(loc)
        kind = error["type"]
        if kind == "missing" and loc and loc[-1] in block.invalid:
            return  # its value was unreadable, and said so already
        if kind == "extra_forbidden":
            known = _field_names(model, loc[:-1])
            hint = _suggest(str(loc[-1]), known) or (
                f"Known settings: {', '.join(known)}." if known else ""
            )
            self.problem(block, line, f"{what}: unknown setting {name!r}", hint)
        elif kind == "missing":
            self.problem(
                block,
                line,
                f"{what}: missing required setting {name!r}",
                f"Add {loc[-1]} = ... to the block.",
            )
        else:
            message = error["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            if not loc:
                # A check of the whole block (a model validator).
                self.problem(block, line, f"{what}: {message}")
                return
            value = shown_value(str(loc[-1]), error.get("input"))
            self.problem(
                block, line, f"{what}: setting {name!r} = {value!r}: {message}"
            )

    # Top level

    def check(self, blocks: list[Block]) -> Config:
        service = ServiceSettings()
        services = [b for b in blocks if b.type == "service"]
        for extra in services[1:]:
            self.problem(
                extra,
                extra.line,
                f"second service block (the first is at {services[0].file}:"
                f"{services[0].line})",
                "Merge them into one.",
            )
        if services:
            checked = self.settings(
                ServiceSettings, services[0].to_dict(), services[0], "service"
            )
            service = checked if isinstance(checked, ServiceSettings) else service
        for block in blocks:
            if block.type not in _TOP_LEVEL:
                self.problem(
                    block,
                    block.line,
                    f"unknown block type {block.type!r}",
                    _suggest(block.type, _TOP_LEVEL)
                    or "Mycel knows connector, flow and service blocks.",
                )

        config = Config(service=service, registry=self.registry)
        config.cluster = self.cluster([b for b in blocks if b.type == "cluster"])
        for block in blocks:
            if block.type == "connector":
                self.connector(block, config)
        for block in blocks:
            if block.type == "flow":
                self.flow(block, config)
        return config

    def cluster(self, blocks: list[Block]) -> ClusterSettings | None:
        for extra in blocks[1:]:
            self.problem(
                extra,
                extra.line,
                f"second cluster block (the first is at {blocks[0].file}:"
                f"{blocks[0].line})",
                "Merge them into one.",
            )
        if not blocks:
            return None
        block = blocks[0]
        checked = self.settings(ClusterSettings, block.to_dict(), block, "cluster")
        if not isinstance(checked, ClusterSettings):
            return None
        scheme = (
            checked.backplane.split("://", 1)[0] if "://" in checked.backplane else ""
        )
        if scheme not in self.registry.backplanes:
            known = ", ".join(sorted(self.registry.backplanes)) or "none installed"
            self.problem(
                block,
                block.line_of(("backplane",)),
                f"cluster: no backplane for {scheme or checked.backplane!r}",
                "Redis backplanes come with mycel-cluster: pip install mycel-cluster. "
                f"Known schemes: {known}.",
            )
            return None
        return checked

    def label(self, block: Block, seen: dict[str, Block]) -> str | None:
        if len(block.labels) != 1:
            self.problem(
                block,
                block.line,
                f"{block.type} block needs exactly one name",
                f'Write {block.type} "name" {{ ... }}.',
            )
            return None
        name = block.labels[0]
        if not _NAME.match(name):
            self.problem(
                block,
                block.line,
                f"{block.type} name {name!r} is not valid",
                "Use letters, digits, '_' and '-', starting with a letter.",
            )
            return None
        if name in seen:
            first = seen[name]
            self.problem(
                block,
                block.line,
                f"duplicate {block.type} name {name!r} (first defined at "
                f"{first.file}:{first.line})",
                "Rename one of them.",
            )
            return None
        seen[name] = block
        return name

    # Connectors

    def connector(self, block: Block, config: Config) -> None:
        name = self.label(block, self.connectors_seen)
        if name is None:
            return
        what = f"connector {name!r}"
        type_attr = block.attributes.get("type")
        # From here on, a connector that fails its checks is "broken": flows
        # naming it are not also told that it does not exist.
        self.broken_connectors.add(name)
        if "type" in block.invalid:
            return
        if type_attr is None or not isinstance(type_attr.value, str):
            self.problem(
                block,
                block.line,
                f"{what} has no type",
                'Add type = "..." (for example type = "memory").',
            )
            return
        type_name = type_attr.value
        cls = self.registry.connector_types.get(type_name)
        if cls is None:
            self.problem(
                block,
                type_attr.line,
                f"{what}: unknown connector type {type_name!r}",
                self.unknown_type_hint(type_name),
            )
            return
        data = {k: v for k, v in block.to_dict().items() if k != "type"}
        settings = self.settings(cls.settings_model, data, block, what)
        if settings is not None:
            self.broken_connectors.discard(name)
            config.connectors[name] = ConnectorConfig(
                name, type_name, cls, settings, block.file, block.line
            )

    def unknown_type_hint(self, type_name: str) -> str:
        failed = self.registry.failed_plugin_for(type_name)
        if failed is not None:
            return (
                f"The plugin {failed.distribution!r} that provides it failed to "
                f"load: {failed.error}. See 'mycel plugins list'."
            )
        distribution = KNOWN_TYPES.get(type_name)
        if distribution is not None:
            return f"It is provided by {distribution}: pip install {distribution}."
        installed = sorted(self.registry.connector_types)
        close = _suggest(type_name, installed)
        listing = f"Installed types: {', '.join(installed) or 'none'}."
        return f"{close} {listing}".strip()

    # Flows

    def flow(self, block: Block, config: Config) -> None:
        name = self.label(block, self.flows_seen)
        if name is None:
            return
        what = f"flow {name!r}"

        flow_data = dict(block.attributes.items())
        retry_blocks = block.blocks_of("retry")
        settings = self.settings(
            _FlowSettings, {k: a.value for k, a in flow_data.items()}, block, what
        )
        retry = RetrySettings()
        if len(retry_blocks) > 1:
            self.problem(
                block, retry_blocks[1].line, f"{what}: more than one retry block"
            )
        if retry_blocks:
            checked = self.settings(
                RetrySettings,
                retry_blocks[0].to_dict(),
                retry_blocks[0],
                f"{what} retry",
            )
            retry = checked if isinstance(checked, RetrySettings) else retry
        for child in block.blocks:
            if child.type not in ("from", "to", "transform", "retry"):
                self.problem(
                    child,
                    child.line,
                    f"{what}: unknown block {child.type!r}",
                    _suggest(child.type, ("from", "to", "transform", "retry"))
                    or "A flow has from, transform, to and retry blocks.",
                )

        sources = block.blocks_of("from")
        if len(sources) != 1:
            line = sources[1].line if len(sources) > 1 else block.line
            self.problem(
                block, line, f"{what} needs exactly one from block, not {len(sources)}"
            )
        source = self.source(sources[0], config, what) if sources else None

        transforms = block.blocks_of("transform")
        if len(transforms) > 1:
            self.problem(
                block,
                transforms[1].line,
                f"{what}: more than one transform block",
                "Put all fields in one transform block.",
            )
        transform: list[tuple[str, Expression]] = []
        if transforms:
            transform = self.transform(transforms[0], what)

        targets = block.blocks_of("to")
        if not targets:
            self.problem(
                block, block.line, f"{what} has no to block", "Add at least one."
            )
        tos = [t for t in (self.target(t, config, what) for t in targets) if t]

        if source is not None and settings is not None and len(tos) == len(targets):
            assert isinstance(settings, _FlowSettings)
            config.flows[name] = FlowConfig(
                name,
                source,
                transform,
                tos,
                retry,
                settings.concurrency,
                block.file,
                block.line,
            )

    def connector_for(
        self, block: Block, config: Config, what: str
    ) -> ConnectorConfig | None:
        attr = block.attributes.get("connector")
        if attr is None or not isinstance(attr.value, str):
            self.problem(
                block, block.line, f"{what}: {block.type} block has no connector"
            )
            return None
        found = config.connectors.get(attr.value)
        if found is None and attr.value not in self.broken_connectors:
            self.problem(
                block,
                attr.line,
                f"{what}: no connector named {attr.value!r}",
                _suggest(attr.value, list(config.connectors))
                or f"Defined connectors: {_listing(config.connectors)}.",
            )
        return found

    def options(
        self,
        model: type[Settings] | None,
        block: Block,
        reserved: tuple[str, ...],
        what: str,
    ) -> tuple[Settings | None, bool]:
        data = {k: v for k, v in block.to_dict().items() if k not in reserved}
        if model is None:
            for key in data:
                attr = block.attributes.get(key)
                self.problem(
                    block,
                    attr.line if attr else block.line,
                    f"{what}: unknown attribute {key!r} in {block.type} block",
                    _suggest(key, reserved) or f"Known: {', '.join(reserved)}.",
                )
            return None, not data
        checked = self.settings(model, data, block, f"{what} {block.type}")
        return checked, checked is not None

    def operation_problem(
        self,
        operations: Sequence[Operation],
        written: str,
        role: str,
        connector: ConnectorConfig,
    ) -> tuple[str, str] | None:
        probe = re.sub(r"\$\{.*?\}", "x", written)
        if any(op.matches(probe) for op in operations):
            return None
        offered = ", ".join(op.pattern for op in operations)
        return (
            f"connector {connector.name!r} ({connector.type}) has no {role} "
            f"operation {written!r}",
            f"It offers: {offered}.",
        )

    def source(self, block: Block, config: Config, what: str) -> FromConfig | None:
        connector = self.connector_for(block, config, what)
        op_attr = block.attributes.get("operation")
        options_model = connector.cls.from_options if connector else None
        options, ok = (None, True)
        if connector is not None:
            options, ok = self.options(
                options_model, block, ("connector", "operation"), what
            )
        if connector is None:
            return None
        operations = self.registry.source_operations(connector.type)
        if not operations:
            self.problem(
                block,
                block.line,
                f"{what}: connector {connector.name!r} ({connector.type}) "
                "cannot be a source",
            )
            return None
        if op_attr is None or not isinstance(op_attr.value, str):
            self.problem(
                block,
                block.line,
                f"{what}: from block has no operation",
                f"It offers: {', '.join(op.pattern for op in operations)}.",
            )
            return None
        found = self.operation_problem(operations, op_attr.value, "source", connector)
        if found is not None:
            self.problem(block, op_attr.line, f"{what}: {found[0]}", found[1])
            return None
        for message in connector.cls.check_binding(
            connector.settings, "source", op_attr.value, options
        ):
            self.problem(block, op_attr.line, f"{what}: {message}")
            ok = False
        if not ok:
            return None
        return FromConfig(
            connector.name, op_attr.value, options, block.file, block.line
        )

    def transform(self, block: Block, what: str) -> list[tuple[str, Expression]]:
        fields: list[tuple[str, Expression]] = []
        for name, attr in block.attributes.items():
            expression = self.expression(
                attr.value, block, attr.line, f"{what} transform {name!r}"
            )
            if expression is not None:
                fields.append((name, expression))
        for child in block.blocks:
            self.problem(
                child,
                child.line,
                f"{what}: nested block {child.type!r} in transform",
                'Transform fields are name = "EXPRESSION".',
            )
        return fields

    def expression(
        self, source: Any, block: Block, line: int, what: str
    ) -> Expression | None:
        if not isinstance(source, str):
            self.problem(
                block,
                line,
                f"{what}: expected an expression string, got {source!r}",
                'Write it in quotes: "input.field".',
            )
            return None
        try:
            return Expression(source, self.registry.functions)
        except ExpressionError as exc:
            self.problem(block, line, f"{what}: {exc}")
            return None

    def template(
        self, source: Any, block: Block, line: int, what: str
    ) -> Template | None:
        if not isinstance(source, str):
            self.problem(block, line, f"{what}: expected a string, got {source!r}")
            return None
        try:
            return Template(source, self.registry.functions)
        except ExpressionError as exc:
            self.problem(block, line, f"{what}: {exc}")
            return None

    def target(self, block: Block, config: Config, what: str) -> ToConfig | None:
        connector = self.connector_for(block, config, what)
        reserved = ("connector", "operation", "target", "filter")
        ok = True
        filter_: Filter | None = None
        filter_attr = block.attributes.get("filter")
        if filter_attr is not None:
            expression = self.expression(
                filter_attr.value, block, filter_attr.line, f"{what} filter"
            )
            ok = expression is not None
            if expression is not None:
                filter_ = Filter(expression, IndexedEquality.detect(expression.source))
        if connector is None:
            # Still check the templates: they do not depend on the connector.
            for name in ("operation", "target"):
                attr = block.attributes.get(name)
                if attr is not None:
                    self.template(attr.value, block, attr.line, f"{what} {name}")
            return None
        options, options_ok = self.options(
            connector.cls.to_options, block, reserved, what
        )
        ok = ok and options_ok

        operations = self.registry.target_operations(connector.type)
        if not operations:
            self.problem(
                block,
                block.line,
                f"{what}: connector {connector.name!r} ({connector.type}) "
                "cannot be a target",
            )
            return None
        op_attr = block.attributes.get("operation")
        written = (
            op_attr.value if op_attr is not None else connector.cls.default_operation
        )
        op_line = op_attr.line if op_attr is not None else block.line
        if written is None:
            self.problem(
                block,
                block.line,
                f"{what}: to block has no operation",
                f"It offers: {', '.join(op.pattern for op in operations)}.",
            )
            return None
        operation = self.template(written, block, op_line, f"{what} operation")
        if operation is None:
            return None
        if isinstance(written, str):
            found = self.operation_problem(operations, written, "target", connector)
            if found is not None:
                self.problem(block, op_line, f"{what}: {found[0]}", found[1])
                ok = False

        target: Template | None = None
        target_attr = block.attributes.get("target")
        if target_attr is not None:
            target = self.template(
                target_attr.value, block, target_attr.line, f"{what} target"
            )
            ok = ok and target is not None
            if target is not None:
                probe = re.sub(r"\$\{.*?\}", "x", target.source)
                for message in connector.cls.check_target(connector.settings, probe):
                    self.problem(block, target_attr.line, f"{what}: {message}")
                    ok = False
        elif connector.cls.target_required:
            self.problem(
                block,
                block.line,
                f"{what}: to block for connector {connector.name!r} "
                f"({connector.type}) needs a target",
                'Add target = "..."',
            )
            ok = False
        for message in connector.cls.check_binding(
            connector.settings, "target", str(written), options
        ):
            self.problem(block, op_line, f"{what}: {message}")
            ok = False
        if not ok:
            return None
        return ToConfig(
            connector.name,
            operation,
            target,
            filter_,
            options,
            connector.cls.fan_out,
            block.file,
            block.line,
        )


def _listing(names: Mapping[str, Any]) -> str:
    return ", ".join(sorted(names)) or "none"


def _field_names(model: type[Settings], path: tuple[Any, ...]) -> list[str]:
    """Names of the fields at ``path`` inside ``model`` (for hints)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", {})
        info = fields.get(part)
        if info is None:
            return []
        annotation = info.annotation
        current = _model_in(annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, Settings):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def check_blocks(
    blocks: list[Block], problems: list[Problem], registry: PluginRegistry
) -> Config:
    checker = _Checker(registry)
    config = checker.check(blocks)
    all_problems = problems + checker.problems
    if not blocks and not all_problems:
        all_problems.append(
            Problem(
                "",
                0,
                "no *.mycel or *.hcl files with blocks were found",
                "Point mycel at the directory that holds your configuration.",
            )
        )
    if all_problems:
        raise ConfigError(all_problems)
    return config


def load_config(
    directory: str | Path,
    registry: PluginRegistry,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load and check every configuration file below ``directory``.

    Raises :class:`~mycel.errors.ConfigError` listing every problem.

    """
    path = Path(directory)
    if not path.is_dir():
        if path.is_file():
            blocks, problems = _read_file(path, environ)
        else:
            raise ConfigError(
                [
                    Problem(
                        "",
                        0,
                        f"no such directory: {str(path)!r}",
                        "Give the directory that holds your .mycel files.",
                    )
                ]
            )
    else:
        blocks, problems = read_directory(path, environ)
    config = check_blocks(blocks, problems, registry)
    config.base_dir = (path if path.is_dir() else path.parent).resolve()
    return config


def _read_file(
    path: Path, environ: Mapping[str, str] | None
) -> tuple[list[Block], list[Problem]]:
    root, problems = read_text(path.read_text(encoding="utf-8"), str(path), environ)
    return root.blocks, problems


def load_config_text(
    text: str,
    registry: PluginRegistry,
    environ: Mapping[str, str] | None = None,
    file: str = "<config>",
    base_dir: Path | None = None,
) -> Config:
    """Like :func:`load_config`, for configuration given as a string."""
    root, problems = read_text(text, file, environ)
    for attr in root.attributes.values():
        problems.append(
            Problem(file, attr.line, f"attribute {attr.name!r} outside any block")
        )
    config = check_blocks(root.blocks, problems, registry)
    config.base_dir = base_dir or Path.cwd()
    return config
