"""The hooks a Mycel plugin may implement.

A plugin is a module (or any object) registered under the ``mycel``
entry-point group of its distribution::

    [project.entry-points.mycel]
    mycel_foo = "mycel_foo.plugin"

and implements some of the hooks below, marked with :data:`hookimpl`::

    from mycel import hookimpl

    @hookimpl
    def mycel_connector_types():
        return [FooConnector]

Hooks are called once each, when the runtime loads its plugins, never per
event. A hook that raises makes its plugin fail to load: the error is
logged with its traceback and shown by ``mycel plugins list``; only
configurations that use that plugin's connector types are refused.

"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._cluster import Backplane
    from ._connector import Connector

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("mycel")
"""Marks a function in this module as a hook specification."""

hookimpl = pluggy.HookimplMarker("mycel")
"""Marks a plugin's function as the implementation of a hook."""


@hookspec
def mycel_connector_types() -> Sequence[type[Connector]]:
    """Return the connector types this plugin provides.

    Called once per plugin when plugins are loaded. Each item is a subclass
    of :class:`mycel.Connector` whose class attributes declare its
    ``type_name``, its ``settings_model`` (a :class:`mycel.Settings`), the
    operations it offers as a source (``source_operations``) and as a target
    (``target_operations``), and the extra attributes it accepts in ``from``
    and ``to`` blocks (``from_options``, ``to_options``).

    Two plugins that provide the same ``type_name`` are a load error of the
    second one; the first keeps the name.

    :return: a sequence of connector classes (may be empty).
    """
    raise NotImplementedError


@hookspec
def mycel_connector_operations(
    type_name: str,
) -> Mapping[str, Sequence[Any]] | None:
    """Contribute further operations to a connector type of another plugin.

    Called once for every connector type after all types are known, with
    that type's name. Return ``None`` to add nothing, or a mapping with the
    keys ``"source"`` and/or ``"target"`` whose values are sequences of
    :class:`mycel.Operation` that the type accepts in addition to its own.
    The connector type itself decides what an operation does; this hook is
    for connector types that accept open-ended operation names (routing
    keys, topics) and want them listed in ``mycel plugins list``.

    :param type_name: the connector type being asked about.
    :return: ``None``, or ``{"source": [...], "target": [...]}``.
    """
    raise NotImplementedError


@hookspec
def mycel_expression_functions() -> Mapping[str, Callable[..., Any]]:
    """Return functions that CEL expressions may call, by name.

    Called once per plugin when plugins are loaded. Every expression in
    every flow (transforms, filters, ``${...}`` templates) may then call
    them: ``filter = "hash_mod(input.id, 4) == 0"``. Functions receive and
    return plain Python values (``int``, ``float``, ``str``, ``bool``,
    ``list``, ``dict``, ``None``) and must not block: they run on the event
    loop for every evaluation. An exception raised by a function makes that
    evaluation fail (for a fan-out filter: false for that subscriber).

    Two plugins that provide the same function name are a load error of the
    second one.

    :return: a mapping from function name to callable (may be empty).
    """
    raise NotImplementedError


@hookspec
def mycel_backplanes() -> Sequence[type[Backplane]]:
    """Return the cluster backplanes this plugin provides.

    Called once per plugin when plugins are loaded. Each item is a subclass
    of :class:`mycel.Backplane` whose ``schemes`` name the URL schemes it
    serves; a ``cluster { backplane = "redis://..." }`` block picks the one
    for its URL's scheme. Two plugins serving the same scheme are a load
    error of the second one.

    :return: a sequence of backplane classes (may be empty).
    """
    raise NotImplementedError
