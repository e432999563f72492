"""mycel-example: a connector plugin for Mycel, started from the template.

``type = "example"``: a timer source (``operation = "tick"``) and a
JSON-lines file target (``operation = "append"``). See README.md.

"""

from __future__ import annotations

from ._connector import ExampleConnector, ExampleSettings

__all__ = ["ExampleConnector", "ExampleSettings"]
