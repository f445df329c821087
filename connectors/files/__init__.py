"""The `files` capture: tails log files, JSON lines or plain text (SPEC "sophia/agent_logs")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connectors.files.config import FilesConfig, FilesResource
from pipeline.connector import Check, Connector

if TYPE_CHECKING:
    from pipeline.task import TaskContext


def _build(ctx: TaskContext) -> Any:
    from connectors.files.capture import FilesCapture

    return FilesCapture(ctx)


async def _doctor(config: FilesConfig) -> list[Check]:
    from connectors.files.capture import doctor

    return await doctor(config)


CONNECTOR = Connector(name="files", kind="capture", config=FilesConfig, resource=FilesResource,
                      build=_build, doctor=_doctor)
