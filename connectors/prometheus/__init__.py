"""The `prometheus` capture: scrapes Prometheus text / OpenMetrics targets (SPEC "sophia/metrics")."""

from __future__ import annotations

from connectors.prometheus.config import PrometheusConfig, PrometheusResource, check
from pipeline.sdk.connector import Connector

CONNECTOR = Connector(
    name="prometheus",
    kind="capture",
    config=PrometheusConfig,
    resource=PrometheusResource,
    build="connectors.prometheus.capture:PrometheusCapture",
    check=check,
    doctor="connectors.prometheus.capture:doctor",
)
