"""Registers ``type = "cdc"`` with Mycel (entry point ``mycel.cdc``)."""

from __future__ import annotations

import mycel

from ._connector import CdcConnector

__all__ = ["mycel_connector_types"]


@mycel.hookimpl
def mycel_connector_types() -> list[type[mycel.Connector]]:
    return [CdcConnector]
