"""The mycel command, run as users run it: a separate process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from mycel.testing import free_port

MYCEL = [sys.executable, "-m", "mycel"]


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "main.mycel").write_text(text)
    return tmp_path


def config(port: int) -> str:
    return f"""
    connector "api" {{
      type = "http"
      port = {port}
    }}
    connector "bus" {{ type = "memory" }}
    flow "accept" {{
      from {{ connector = "api" operation = "POST /orders" }}
      to {{ connector = "bus" target = "orders" }}
    }}
    """


def test_version() -> None:
    result = subprocess.run([*MYCEL, "--version"], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (0, "mycel 0.1.0\n")


def test_validate_good_configuration(tmp_path: Path) -> None:
    result = subprocess.run(
        [*MYCEL, "validate", str(write(tmp_path, config(8080)))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    assert result.stdout == "Configuration OK: 2 connectors, 1 flows.\n"


def test_validate_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    directory = write(
        tmp_path,
        'connector "bus" {\n  type = "memory"\n  bufer = 1\n}\n'
        'connector "x" { type = "kafka" }\n',
    )
    result = subprocess.run(
        [*MYCEL, "validate", str(directory)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "Error: The configuration has 2 problems:\n"
        f"  {directory}/main.mycel:3: connector 'bus': unknown setting 'bufer'. "
        "Did you mean 'buffer'?\n"
        f"  {directory}/main.mycel:5: connector 'x': unknown connector type 'kafka'. "
        f"Installed types: {', '.join(_installed_types())}.\n"
        "Fix these and run the command again.\n"
    )


def _installed_types() -> list[str]:
    from mycel import load_plugins

    return sorted(load_plugins().connector_types)


def test_plugins_list_json_shows_core() -> None:
    result = subprocess.run(
        [*MYCEL, "plugins", "list", "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    (core,) = [r for r in rows if r["distribution"] == "mycel"]
    assert core["status"] == "ok"
    assert core["version"] == "0.1.0"
    memory = next(t for t in core["connector_types"] if t["type"] == "memory")
    assert memory == {
        "type": "memory",
        "source_operations": ["TOPIC_PATTERN"],
        "target_operations": ["publish"],
    }


def test_plugins_list_table() -> None:
    result = subprocess.run([*MYCEL, "plugins", "list"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "mycel 0.1.0  (mycel)  ok\n  connector type 'memory'\n" in result.stdout


def test_run_serves_until_sigterm_then_exits_cleanly(tmp_path: Path) -> None:
    port = free_port()
    directory = write(tmp_path, config(port))
    proc = subprocess.Popen(
        [*MYCEL, "run", str(directory)], stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "started: 2 connectors, 1 flows" in line:
                break
        assert any(
            f"mycel.http: connector 'api' listening on http://127.0.0.1:{port}/" in ln
            for ln in lines
        ), lines
        response = httpx.post(f"http://127.0.0.1:{port}/orders", json={"id": 1})
        assert response.status_code == 202
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=10) == 0
        assert "shutting down: draining in-flight events" in rest
        assert "mycel stopped" in rest
    finally:
        proc.kill()
        proc.wait()


def test_run_with_a_port_in_use_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        directory = write(tmp_path, config(port))
        result = subprocess.run(
            [*MYCEL, "run", str(directory)], capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: Cannot listen on 127.0.0.1:{port}: Address already in use."
    )


def test_run_picks_uvloop_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvloop

    from mycel.cli import _loop_factory
    from mycel.errors import MycelError

    assert _loop_factory("auto") is uvloop.new_event_loop
    assert _loop_factory("uvloop") is uvloop.new_event_loop
    assert _loop_factory("asyncio") is None

    # Without uvloop installed: auto falls back, uvloop is a clear error.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert _loop_factory("auto") is None
    with pytest.raises(MycelError, match="uvloop is not installed"):
        _loop_factory("uvloop")
