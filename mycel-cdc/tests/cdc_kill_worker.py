"""``mycel run`` for test_cdc_kill: a cdc source into an append-only file.

Run as ``python cdc_kill_worker.py CONFIG_DIR``. The ``jsonfile`` target
writes one JSON line per event with ``os.write`` before it returns: the line
is in the kernel then, so killing this process (SIGKILL) cannot lose a
delivered event, which is all the test needs (it does not crash the
machine, so no fsync).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import mycel
from mycel.cli import serve
from mycel_cdc import _plugin as cdc_plugin


class FileSettings(mycel.Settings):
    path: str


class JsonFileTarget(mycel.Connector):
    type_name = "jsonfile"
    settings_model = FileSettings
    target_operations = (mycel.Operation("append", "append a JSON line"),)
    default_operation = "append"

    async def start(self) -> None:
        assert isinstance(self.settings, FileSettings)
        self._fd = os.open(self.settings.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    async def deliver(self, delivery: mycel.Delivery) -> None:
        event: Any = delivery.payload
        line = {
            "pid": os.getpid(),
            "table": event["_table"],
            "seq": event["seq"],
            "op": event["_operation"],
            "lsn": event["_lsn"],
        }
        os.write(self._fd, (json.dumps(line) + "\n").encode())

    async def close(self) -> None:
        os.close(self._fd)


class _Plugin:
    @mycel.hookimpl
    def mycel_connector_types(self) -> list[type[mycel.Connector]]:
        return [JsonFileTarget]


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Only the plugins this configuration uses: a restart after each SIGKILL
    # should not spend seconds importing every installed distribution.
    plugins = mycel.load_plugins(
        [("cdc", cdc_plugin), ("jsonfile", _Plugin())], entry_point_group=None
    )
    config = mycel.load_config(sys.argv[1], plugins)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
