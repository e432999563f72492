"""The connector as the command line shows it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def mycel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mycel", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_plugins_list_shows_the_connector_type() -> None:
    result = mycel("plugins", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = [row for row in json.loads(result.stdout) if row["name"] == "rabbit"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["distribution"], row["status"], row["error"]) == (
        "mycel-rabbit",
        "ok",
        None,
    )
    assert row["connector_types"] == [
        {
            "type": "rabbitmq",
            "source_operations": ["ROUTING_KEY_PATTERN"],
            "target_operations": ["publish"],
        }
    ]


def test_validate_reports_problems_without_the_password(tmp_path: Path) -> None:
    (tmp_path / "main.mycel").write_text(
        """connector "rabbit" {
  type          = "rabbitmq"
  url           = "amqp://app:hunter2@localhost/"
  exchange_type = "direct"
}
connector "mem" { type = "memory" }
flow "f" {
  from { connector = "rabbit"  operation = "order.*" }
  to   { connector = "mem"     target = "x" }
}
flow "g" {
  from { connector = "rabbit"  operation = "x.y" }
  to   { connector = "rabbit"  target = "z" }
}
""",
        encoding="utf-8",
    )
    result = mycel("validate", str(tmp_path))
    assert result.returncode == 2
    assert "hunter2" not in result.stdout + result.stderr
    assert (
        f"{tmp_path / 'main.mycel'}:8: flow 'f': routing-key pattern 'order.*' has "
        "wildcards, but the exchange type is 'direct'; wildcards need "
        'exchange_type = "topic".'
    ) in result.stderr
    assert "The configuration has 1 problem:" in result.stderr
