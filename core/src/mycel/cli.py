"""The ``mycel`` command.

``mycel run DIR``, ``mycel validate DIR``, ``mycel plugins list [--json]``
and ``mycel --version``. User errors (a broken configuration, a port in use)
print a clean message and exit non-zero; ``--traceback`` shows the Python
traceback as well. Exit codes: 0 success, 1 runtime failure, 2 invalid
configuration or usage.

"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ._config import Config, load_config
from ._plugins import PluginRegistry, load_plugins
from ._runtime import Runtime
from ._workers import run_workers, worker_index
from .errors import ConfigError, MycelError

__all__ = ["main"]

logger = logging.getLogger("mycel.run")


def _version() -> str:
    try:
        return version("mycel")
    except PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mycel",
        description="Declarative runtime for real-time and event-driven delivery.",
    )
    parser.add_argument("--version", action="version", version=f"mycel {_version()}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default: INFO)",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="show tracebacks of errors"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="start every connector and flow in DIR")
    run.add_argument("directory", metavar="DIR")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the listening ports (needs a cluster block)",
    )
    run.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop where installed (auto), or the standard one",
    )

    validate = commands.add_parser("validate", help="check DIR and exit")
    validate.add_argument("directory", metavar="DIR")

    plugins = commands.add_parser("plugins", help="installed plugins")
    plugin_commands = plugins.add_subparsers(
        dest="plugins_command", metavar="SUBCOMMAND"
    )
    listing = plugin_commands.add_parser("list", help="list installed plugins")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("mycel").setLevel(level)
    # Protocol libraries log every connection opening and closing at INFO;
    # that is per-client detail, shown only at DEBUG.
    if level != "DEBUG":
        logging.getLogger("mycel.ws.protocol").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "validate":
            return _validate(args)
        if args.command == "plugins" and args.plugins_command == "list":
            return _plugins_list(args)
    except ConfigError as exc:
        print(f"Error: {_sentence(str(exc))}", file=sys.stderr)
        print("Fix these and run the command again.", file=sys.stderr)
        return 2
    except MycelError as exc:
        if args.traceback:
            logger.exception("failed")
        print(f"Error: {_sentence(str(exc))}", file=sys.stderr)
        return 1
    parser.print_help(sys.stderr)
    return 2


def _sentence(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "\n")) or "\n" in text else text + "."


def _load(directory: str) -> Config:
    registry = load_plugins()
    return load_config(directory, registry)


def _validate(args: argparse.Namespace) -> int:
    config = _load(args.directory)
    print(
        f"Configuration OK: {len(config.connectors)} connectors, "
        f"{len(config.flows)} flows."
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    config = _load(args.directory)
    if args.workers != 1:
        return run_workers(args, config)
    with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
        return runner.run(serve(config, Runtime(config, worker=worker_index())))


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when asked for or, with ``auto``, installed.

    uvloop runs the same asyncio code with less overhead per callback and
    per socket operation, which is most of what a busy Mycel process does.

    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise MycelError(
                "--loop uvloop: uvloop is not installed (pip install uvloop)"
            ) from None
        return None
    return uvloop.new_event_loop


async def serve(config: Config, runtime: Runtime | None = None) -> int:
    """Run until SIGINT or SIGTERM, then drain and stop."""
    runtime = runtime or Runtime(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await runtime.start()

    # What start-up built (plugins, parsers, the configuration) lives as
    # long as the process: out of the collector's sight, a full collection
    # under load walks only what events allocate (15-20% of a CDC stream's
    # time was full collections walking start-up objects).
    gc.freeze()
    try:
        await stop.wait()
        logger.info("shutting down: draining in-flight events")
    finally:
        drained = await runtime.stop()
    return 0 if drained else 1


def _plugins_list(args: argparse.Namespace) -> int:
    registry = load_plugins()
    rows = _plugin_rows(registry)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        status = row["status"] if row["status"] == "ok" else f"error: {row['error']}"
        print(f"{row['distribution']} {row['version']}  ({row['name']})  {status}")
        for connector in row["connector_types"]:
            print(f"  connector type {connector['type']!r}")
            if connector["source_operations"]:
                print(f"    source: {', '.join(connector['source_operations'])}")
            if connector["target_operations"]:
                print(f"    target: {', '.join(connector['target_operations'])}")
        if row["functions"]:
            print(f"  functions: {', '.join(row['functions'])}")
    return 0


def _plugin_rows(registry: PluginRegistry) -> list[dict[str, Any]]:
    rows = []
    for info in registry.plugins:
        types = []
        for type_name in info.connector_types:
            types.append(
                {
                    "type": type_name,
                    "source_operations": [
                        op.pattern for op in registry.source_operations(type_name)
                    ],
                    "target_operations": [
                        op.pattern for op in registry.target_operations(type_name)
                    ],
                }
            )
        rows.append(
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "status": info.status,
                "error": info.error,
                "connector_types": types,
                "functions": info.functions,
            }
        )
    return rows
