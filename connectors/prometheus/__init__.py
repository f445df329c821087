"""The `prometheus` capture: scrapes Prometheus text / OpenMetrics targets (SPEC "sophia/metrics")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connectors.prometheus.config import PrometheusConfig, PrometheusResource, check
from pipeline.connector import Check, Connector

if TYPE_CHECKING:
    from pipeline.task import TaskContext


def _build(ctx: TaskContext) -> Any:
    from connectors.prometheus.capture import PrometheusCapture

    return PrometheusCapture(ctx)


async def _doctor(config: PrometheusConfig) -> list[Check]:
    from connectors.prometheus.capture import doctor

    return await doctor(config)


CONNECTOR = Connector(name="prometheus", kind="capture", config=PrometheusConfig, resource=PrometheusResource,
                      build=_build, check=check, doctor=_doctor)
