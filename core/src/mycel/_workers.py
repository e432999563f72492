"""``mycel run --workers N``: N processes sharing ports and a backplane.

One Python process uses one core. The supervisor started by ``--workers N``
runs N copies of ``mycel run DIR`` (each told its index through the
``MYCEL_WORKER`` environment variable), which listen with SO_REUSEPORT so
that the kernel spreads connections across them, and share fan-out through
the cluster backplane. SIGINT or SIGTERM to the supervisor is passed on to
every worker, which drains and stops as a single process would. A worker
that dies is started again after a pause, and the death is logged.

The admin endpoint of worker ``i`` listens on ``admin_port + i``, so that
each process's metrics can be scraped.

"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

from ._config import Config
from .errors import MycelError

__all__ = ["run_workers", "worker_index"]

logger = logging.getLogger("mycel.run")

WORKER_ENV = "MYCEL_WORKER"


def worker_index() -> int | None:
    """This process's worker index, or None when not run by a supervisor."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value and value.isdigit() else None


def run_workers(args: Namespace, config: Config) -> int:
    """Supervise ``args.workers`` worker processes until told to stop."""
    count = args.workers
    if count < 1:
        raise MycelError(f"--workers must be at least 1, not {count}")
    if config.cluster is None:
        raise MycelError(
            "--workers needs a cluster block, so that every worker delivers "
            'every event: add cluster { backplane = "redis://127.0.0.1:6379/0" }'
        )
    command = [
        sys.executable,
        "-m",
        "mycel",
        "--log-level",
        args.log_level,
        "run",
        "--loop",
        args.loop,
        args.directory,
    ]
    stopping = False

    def start(index: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, **{WORKER_ENV: str(index)})
        return subprocess.Popen(command, env=env)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    workers = [start(i) for i in range(count)]
    logger.info("started %d workers: pids %s", count, [p.pid for p in workers])
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    # Restart workers that die on their own; stop when all have exited.
    while True:
        alive = False
        for index, proc in enumerate(workers):
            code = proc.poll()
            if code is None:
                alive = True
            elif not stopping:
                logger.warning(
                    "worker %d (pid %d) exited with %d; starting it again",
                    index,
                    proc.pid,
                    code,
                )
                time.sleep(1.0)
                workers[index] = start(index)
                alive = True
        if not alive:
            break
        time.sleep(0.2)
    codes = [p.returncode for p in workers]
    return 0 if all(c == 0 for c in codes) else 1
