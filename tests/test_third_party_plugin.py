"""A third party's plugins, installed as a user installs them, really run.

The plugin template (``plugins/template``), a copy of it renamed the way
the plugin guide says (``mycel-acme``), and the Redis connector written
from it (``plugins/mycel-redis``) are copied out of the repository, as a
third party's own project or a downloaded sdist would be, and installed
with pip, not in editable mode, into a fresh virtual environment together
with core. Then, in that environment only:

- ``mycel plugins list --json`` shows the three plugins, loaded;
- ``mycel run`` runs a flow from a Redis stream to Redis pub/sub and a
  stream, and stops cleanly on SIGTERM;
- the template's own tests pass, run the way its author runs them, as is
  and renamed.

And the plugin guide (docs/writing-a-plugin.md), which is all a third party
reads, names every hook and every public name of ``mycel``.

pip takes the dependencies from the package index the machine is set up
with; nothing is fetched from elsewhere.

"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testsupport.base import ROOT

# Creating the environment (pip resolving and building four projects) is
# part of the first test's time; give it room beyond the default 300 s.
pytestmark = pytest.mark.timeout(900)

_COPY_IGNORE = shutil.ignore_patterns(
    "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache"
)


def _run(args: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited with {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}"
    )
    return result.stdout


# The renaming table of docs/writing-a-plugin.md, section 1.
_RENAMES = (
    ("mycel-example", "mycel-acme"),
    ("mycel_example", "mycel_acme"),
    ("ExampleConnector", "AcmeConnector"),
    ("ExampleSettings", "AcmeSettings"),
    ('"mycel.example"', '"mycel.acme"'),
    ('"example"', '"acme"'),
)


def _rename_template(project: Path) -> None:
    """Rename a copy of the template as the plugin guide tells its reader."""
    (project / "src" / "mycel_example").rename(project / "src" / "mycel_acme")
    (project / "tests" / "test_example.py").rename(project / "tests" / "test_acme.py")
    for path in project.rglob("*"):
        if path.suffix in (".py", ".toml", ".md"):
            text = path.read_text(encoding="utf-8")
            for old, new in _RENAMES:
                text = text.replace(old, new)
            path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def venv() -> Iterator[Path]:
    """A fresh virtual environment with core, mycel-redis and the template
    (as is, and renamed to mycel-acme).

    It lives outside pytest's temporary folders, which concurrent pytest
    sessions on the same machine prune.

    """
    base = Path(tempfile.mkdtemp(prefix="mycel-third-party-"))
    try:
        sources = base / "src"
        for name, source in (
            ("mycel", ROOT / "core"),
            ("mycel-redis", ROOT / "plugins" / "mycel-redis"),
            ("mycel-example", ROOT / "plugins" / "template"),
        ):
            shutil.copytree(source, sources / name, ignore=_COPY_IGNORE)
        shutil.copytree(
            ROOT / "plugins" / "template", sources / "mycel-acme", ignore=_COPY_IGNORE
        )
        _rename_template(sources / "mycel-acme")

        env = base / "venv"
        _run([sys.executable, "-m", "venv", str(env)])
        _run(
            [
                str(env / "bin" / "python"), "-m", "pip", "install", "--quiet",
                str(sources / "mycel"),
                str(sources / "mycel-redis"),
                f"{sources / 'mycel-example'}[test]",
                str(sources / "mycel-acme"),
            ]
        )  # fmt: skip
        yield env
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[tuple[Any, str]]:
    """A synchronous redis-py client and a key prefix deleted afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    prefix = f"mycel-test-{uuid.uuid4().hex[:12]}-"
    try:
        yield client, prefix
    finally:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.mark.slow
def test_plugins_list_shows_the_installed_plugins(venv: Path) -> None:
    rows = json.loads(_run([str(venv / "bin" / "mycel"), "plugins", "list", "--json"]))
    assert sorted(row["distribution"] for row in rows) == [
        "mycel",
        "mycel-acme",
        "mycel-example",
        "mycel-redis",
    ]
    by_distribution = {row["distribution"]: row for row in rows}
    assert by_distribution["mycel-redis"] == {
        "name": "mycel_redis",
        "distribution": "mycel-redis",
        "version": "0.1.0",
        "status": "ok",
        "error": None,
        "connector_types": [
            {
                "type": "redis",
                "source_operations": ["channel:NAME", "pattern:GLOB", "stream:NAME"],
                "target_operations": ["publish", "xadd"],
            }
        ],
        "functions": [],
    }
    assert by_distribution["mycel-acme"]["connector_types"] == [
        {"type": "acme", "source_operations": ["tick"], "target_operations": ["append"]}
    ]
    assert by_distribution["mycel-acme"]["status"] == "ok"
    assert by_distribution["mycel-example"] == {
        "name": "mycel_example",
        "distribution": "mycel-example",
        "version": "0.1.0",
        "status": "ok",
        "error": None,
        "connector_types": [
            {
                "type": "example",
                "source_operations": ["tick"],
                "target_operations": ["append"],
            }
        ],
        "functions": [],
    }


@pytest.mark.slow
def test_redis_plugin_runs_a_flow_and_stops_cleanly(
    venv: Path,
    redis_url: str,
    redis_sync: tuple[Any, str],
    tmp_path: Path,
) -> None:
    client, prefix = redis_sync
    source, channel, copy = prefix + "orders", prefix + "news", prefix + "copy"
    (tmp_path / "main.mycel").write_text(
        f"""
        connector "cache" {{
          type = "redis"
          url  = "{redis_url}"
        }}
        flow "relay" {{
          from {{
            connector = "cache"
            operation = "stream:{source}"
            start     = "beginning"
          }}
          transform {{
            order  = "input.id"
            status = "'seen'"
          }}
          to {{ connector = "cache"  target = "{channel}" }}
          to {{ connector = "cache"  operation = "xadd"  target = "{copy}" }}
        }}
        """,
        encoding="utf-8",
    )
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    confirmation = pubsub.get_message(timeout=5)
    assert confirmation is not None
    assert confirmation["type"] == "subscribe"

    # The group starts at the beginning, so the entry is read whenever the
    # process is ready: no need to wait for it before adding.
    process = subprocess.Popen(
        [str(venv / "bin" / "mycel"), "run", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client.xadd(source, {"data": '{"id": 42}'})
        copied = client.xread({copy: "0"}, count=1, block=30_000)
        message = pubsub.get_message(timeout=5)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        pubsub.close()

    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert copied, f"nothing reached {copy!r}; the process said:\n{stderr}"
    [[_, [(_, fields)]]] = copied
    assert fields == {b"data": b'{"order":42,"status":"seen"}'}
    assert message is not None
    assert message["data"] == b'{"order":42,"status":"seen"}'
    assert client.xpending(source, "relay")["pending"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("project", ["mycel-example", "mycel-acme"])
def test_template_tests_pass_where_its_author_runs_them(
    venv: Path, project: str
) -> None:
    # The template's own test suite, from its own folder, with the
    # distribution installed from a copy (as pip would from an sdist).
    folder = venv.parent / "src" / project
    output = _run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=folder,
    )
    assert output.splitlines()[-1].startswith("6 passed"), output


def test_plugin_guide_names_every_hook_and_public_name() -> None:
    import mycel
    import mycel.testing
    from mycel import hookspecs

    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text(encoding="utf-8")
    hooks = sorted(name for name in dir(hookspecs) if name.startswith("mycel_"))
    names = [*mycel.__all__, *mycel.testing.__all__, *hooks]
    missing = [name for name in names if f"`{name}" not in guide]
    assert missing == [], f"docs/writing-a-plugin.md does not mention {missing}"
