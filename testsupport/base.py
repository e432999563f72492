"""Generic fixtures: free ports, the repository root, service checks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def service_unavailable(what: str) -> None:
    """Skip a test whose service is missing, or fail it under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not available, and CI needs it")
    pytest.skip(f"{what} is not available")


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture
def repo_root() -> Path:
    return ROOT
