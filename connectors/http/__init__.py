"""The `http` capture: polls a JSON API (the Sophia AI platform's records, SPEC "sophia/sophia_ai_data")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connectors.http.config import HttpConfig, HttpResource, check
from pipeline.connector import Check, Connector

if TYPE_CHECKING:
    from pipeline.task import TaskContext


def _build(ctx: TaskContext) -> Any:
    from connectors.http.capture import HttpCapture

    return HttpCapture(ctx)


async def _doctor(config: HttpConfig) -> list[Check]:
    from connectors.http.capture import doctor

    return await doctor(config)


CONNECTOR = Connector(name="http", kind="capture", config=HttpConfig, resource=HttpResource,
                      build=_build, check=check, doctor=_doctor)
