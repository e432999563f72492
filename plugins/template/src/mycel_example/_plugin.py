"""The module the ``mycel`` entry point names: Mycel loads it at start-up.

Keep it to hook implementations. Importing it must be cheap and must not
do I/O; a failure here is shown by ``mycel plugins list``.

"""

from __future__ import annotations

from collections.abc import Sequence

import mycel

from ._connector import ExampleConnector


@mycel.hookimpl
def mycel_connector_types() -> Sequence[type[mycel.Connector]]:
    return [ExampleConnector]
