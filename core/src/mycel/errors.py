"""The exceptions Mycel raises.

Everything Mycel raises on purpose derives from :class:`MycelError`, so a
caller can catch the whole family at once. The tree is short on purpose::

    MycelError
    ├── ConfigError          the configuration cannot be loaded
    ├── PluginError          a plugin cannot be loaded or misbehaves
    ├── ExpressionError      a CEL expression does not compile or fails
    ├── ConnectorError       a connector cannot do what it was asked
    │   └── DeliveryError    one event could not be delivered
    └── FlowError            a flow gave up on an event

Plugins subclass these rather than inventing roots of their own.

"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "ConnectorError",
    "DeliveryError",
    "ExpressionError",
    "FlowError",
    "MycelError",
    "PluginError",
    "Problem",
]


class MycelError(Exception):
    """Root of every exception Mycel raises on purpose."""


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a configuration, with where it is.

    ``file`` and ``line`` point at the offending attribute or block; both are
    empty when the problem has no single place (a plugin that failed to load,
    say). ``hint`` tells the user how to fix it.

    """

    file: str
    line: int
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.file else ""
        hint = f" {self.hint}" if self.hint else ""
        return f"{where}{self.message}.{hint}"


class ConfigError(MycelError):
    """The configuration cannot be loaded.

    ``problems`` holds every problem found, sorted by file and line, so that a
    user fixes them all in one pass rather than one per run.

    """

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = sorted(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = [f"the configuration has {count} {noun}:"]
        lines += [f"  {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


class PluginError(MycelError):
    """A plugin cannot be loaded, or broke the contract of a hook."""


class ExpressionError(MycelError):
    """A CEL expression does not compile, or its evaluation failed."""


class ConnectorError(MycelError):
    """A connector cannot start, stop, or do what a flow asked of it."""


class DeliveryError(ConnectorError):
    """One event could not be delivered by a ``to`` block.

    ``permanent`` tells the flow engine that trying again cannot help (a
    payload the target rejects, say), so the source dead-letters the event
    at once instead of spending its retries.

    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class FlowError(MycelError):
    """A flow gave up on an event after its last attempt.

    ``flow`` names the flow; ``permanent`` is true when the failure cannot be
    cured by redelivery (a transform that fails on this input), so a source
    with a dead-letter policy applies it without further retries.

    """

    def __init__(self, flow: str, message: str, *, permanent: bool = False) -> None:
        super().__init__(f"flow {flow!r}: {message}")
        self.flow = flow
        self.reason = message
        self.permanent = permanent
