"""The `http` capture: polls a JSON API (the Sophia AI platform's records, SPEC "sophia/sophia_ai_data")."""

from __future__ import annotations

from connectors.http.config import HttpConfig, HttpResource, check
from pipeline.sdk.connector import Connector

CONNECTOR = Connector(
    name="http",
    kind="capture",
    config=HttpConfig,
    resource=HttpResource,
    build="connectors.http.capture:HttpCapture",
    check=check,
    doctor="connectors.http.capture:doctor",
)
