"""The `files` capture: tails log files, JSON lines or plain text (SPEC "sophia/agent_logs")."""

from __future__ import annotations

from connectors.files.config import FilesConfig, FilesResource
from pipeline.sdk.connector import Connector

CONNECTOR = Connector(
    name="files",
    kind="capture",
    config=FilesConfig,
    resource=FilesResource,
    build="connectors.files.capture:FilesCapture",
    doctor="connectors.files.capture:doctor",
)
