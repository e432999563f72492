"""Finding and loading plugins.

This is the only module that calls ``pm.hook.*``; everything else asks the
:class:`PluginRegistry` it builds. Each entry point of the ``mycel`` group
loads in its own ``try``: a plugin that fails is logged with its traceback,
recorded, and shown by ``mycel plugins list``, and it breaks only the
configurations that use its connector types.

"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

import pluggy

from . import hookspecs
from ._cluster import Backplane
from ._connector import Connector, Operation

__all__ = ["KNOWN_TYPES", "PluginInfo", "PluginRegistry", "load_plugins"]

logger = logging.getLogger("mycel.plugins")

KNOWN_TYPES = {
    "cdc": "mycel-cdc",
    "database": "mycel-database",
    "elasticsearch": "mycel-elasticsearch",
    "graphql": "mycel-graphql",
    "rabbitmq": "mycel-rabbit",
    "redis": "mycel-redis",
    "sse": "mycel-sse",
    "websocket": "mycel-ws",
}
"""Connector types of the first-party distributions, for install hints."""


@dataclass
class PluginInfo:
    """What ``mycel plugins list`` shows of one plugin."""

    name: str
    distribution: str
    version: str
    connector_types: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    backplanes: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "error"


@dataclass
class PluginRegistry:
    """Everything the installed plugins provide."""

    plugins: list[PluginInfo] = field(default_factory=list)
    connector_types: dict[str, type[Connector]] = field(default_factory=dict)
    type_plugin: dict[str, PluginInfo] = field(default_factory=dict)
    functions: dict[str, Callable[..., Any]] = field(default_factory=dict)
    extra_operations: dict[str, dict[str, list[Operation]]] = field(
        default_factory=dict
    )
    backplanes: dict[str, type[Backplane]] = field(default_factory=dict)

    def failed_plugin_for(self, type_name: str) -> PluginInfo | None:
        """The failed plugin whose distribution would provide ``type_name``."""
        distribution = KNOWN_TYPES.get(type_name)
        for info in self.plugins:
            if info.error is not None and distribution in (
                info.distribution,
                info.name,
            ):
                return info
        return None

    def source_operations(self, type_name: str) -> list[Operation]:
        cls = self.connector_types[type_name]
        extra = self.extra_operations.get(type_name, {}).get("source", [])
        return [*cls.source_operations, *extra]

    def target_operations(self, type_name: str) -> list[Operation]:
        cls = self.connector_types[type_name]
        extra = self.extra_operations.get(type_name, {}).get("target", [])
        return [*cls.target_operations, *extra]


def _distribution_of(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return ep.name, "unknown"
    return dist.metadata["Name"] or ep.name, dist.version


def load_plugins(
    extra: Iterable[tuple[str, object]] = (),
    *,
    entry_point_group: str | None = "mycel",
) -> PluginRegistry:
    """Load the plugins of the entry-point group, plus ``extra`` ones.

    ``extra`` holds ``(name, plugin)`` pairs registered directly, as tests
    and ``mycel.testing`` do. ``entry_point_group=None`` skips entry points.

    """
    pm = pluggy.PluginManager("mycel")
    pm.add_hookspecs(hookspecs)
    registry = PluginRegistry()

    # Register each entry point on its own, so one broken plugin stays
    # one broken plugin.
    candidates: list[tuple[PluginInfo, Callable[[], object]]] = []
    if entry_point_group is not None:
        for ep in sorted(entry_points(group=entry_point_group), key=lambda e: e.name):
            distribution, version = _distribution_of(ep)
            candidates.append((PluginInfo(ep.name, distribution, version), ep.load))
    for name, plugin in extra:
        candidates.append((PluginInfo(name, name, "local"), _constant(plugin)))

    for info, load in candidates:
        try:
            plugin = load()
            if pm.is_registered(plugin):
                continue  # given twice (an entry point and directly): once
            registry.plugins.append(info)
            pm.register(plugin, name=info.name)
            # A misspelled hook would otherwise never fire: fail it now.
            pm.check_pending()
            _collect(pm, plugin, info, registry)
        except Exception as exc:  # plugin boundary: anything may go wrong
            if info not in registry.plugins:
                registry.plugins.append(info)
            if pm.get_plugin(info.name) is not None:
                pm.unregister(name=info.name)
            _record_failure(info, exc)

    # Operations contributed to other plugins' types come last, once every
    # type is known.
    for type_name in registry.connector_types:
        for impl in pm.hook.mycel_connector_operations.get_hookimpls():
            try:
                result = impl.function(type_name=type_name)
            except Exception as exc:  # plugin boundary
                owner = next(
                    (p for p in registry.plugins if p.name == impl.plugin_name), None
                )
                if owner is not None:
                    _record_failure(owner, exc)
                continue
            if result:
                slot = registry.extra_operations.setdefault(type_name, {})
                contributed = cast(Mapping[str, Sequence[Operation]], result)
                for role in ("source", "target"):
                    slot.setdefault(role, []).extend(contributed.get(role, ()))
    return registry


def _constant(plugin: object) -> Callable[[], object]:
    return lambda: plugin


def _collect(
    pm: pluggy.PluginManager, plugin: object, info: PluginInfo, registry: PluginRegistry
) -> None:
    """Ask one plugin for its types and functions; raise if it misbehaves."""
    types: list[type[Connector]] = []
    functions: dict[str, Callable[..., Any]] = {}
    backplanes: list[type[Backplane]] = []
    for impl in pm.hook.mycel_connector_types.get_hookimpls():
        if impl.plugin is plugin:
            types += list(cast(Iterable[Any], impl.function() or ()))
    for impl in pm.hook.mycel_expression_functions.get_hookimpls():
        if impl.plugin is plugin:
            functions.update(cast(Mapping[str, Any], impl.function() or {}))
    for impl in pm.hook.mycel_backplanes.get_hookimpls():
        if impl.plugin is plugin:
            backplanes += list(cast(Iterable[Any], impl.function() or ()))

    # Check everything before adding anything, so a failure adds nothing.
    for cls in types:
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise TypeError(f"{cls!r} is not a subclass of mycel.Connector")
        if not cls.type_name:
            raise TypeError(f"{cls.__name__} has no type_name")
        if cls.type_name in registry.connector_types:
            owner = registry.type_plugin[cls.type_name].name
            raise TypeError(
                f"connector type {cls.type_name!r} is already provided by {owner!r}"
            )
    for name in functions:
        if name in registry.functions:
            raise TypeError(f"expression function {name!r} is already provided")
    for backplane in backplanes:
        if not (isinstance(backplane, type) and issubclass(backplane, Backplane)):
            raise TypeError(f"{backplane!r} is not a subclass of mycel.Backplane")
        for scheme in backplane.schemes:
            if scheme in registry.backplanes:
                raise TypeError(f"backplane scheme {scheme!r} is already provided")

    for cls in types:
        registry.connector_types[cls.type_name] = cls
        registry.type_plugin[cls.type_name] = info
        info.connector_types.append(cls.type_name)
    registry.functions.update(functions)
    info.functions = sorted(functions)
    for backplane in backplanes:
        for scheme in backplane.schemes:
            registry.backplanes[scheme] = backplane
            info.backplanes.append(scheme)


def _record_failure(info: PluginInfo, exc: BaseException) -> None:
    info.error = f"{type(exc).__name__}: {exc}"
    info.traceback = "".join(traceback.format_exception(exc))
    logger.error(
        "plugin %r (%s) failed to load", info.name, info.distribution, exc_info=exc
    )
