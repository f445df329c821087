"""Configuration of the `prometheus` capture: the targets one scrape job reads every interval.

Example (the Sophia catalog)::

    sophia/metrics:
      interval: 30s
      endpoint:
        prometheus:
          targets: ["${SOPHIA_METRICS_URL:-http://127.0.0.1:8701/metrics}"]
          job: sophia
          timeout: 10s
      bindings:
        - target: sophia/sophia_metrics
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
from pydantic import Field, SecretStr, field_validator

from pipeline.sdk.config import Duration, Model

if TYPE_CHECKING:
    from pipeline.runtime.catalog import CaptureSpec, Catalog
    from pipeline.sdk.connector import Problems


class PrometheusAdvanced(Model):
    """Rarely changed settings."""

    openmetrics: bool = Field(
        default=True,
        description="Ask for OpenMetrics first (Accept header, as Prometheus does); the parser is chosen by the "
                    "response's Content-Type either way.")
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024,
        description="A larger (decoded) body fails the scrape (up 0), so one target cannot exhaust memory.")
    verify_tls: bool = Field(default=True, description="Verify the targets' TLS certificates.")


class PrometheusConfig(Model):
    """Targets to scrape (Prometheus text format or OpenMetrics) and how.

    Every sample becomes one document::

        {"timestamp": <sample timestamp, else scrape time>, "source": <job>,
         "data": {"name": "http_request_duration_seconds_bucket", "type": "histogram",
                  "labels": {"le": "0.5", "job": "sophia", "instance": "127.0.0.1:8701"}, "value": 3.0},
         "metadata": {"id": <sha256 of target, name, sorted labels, timestamp>, "target": <url>,
                      "format": "text" | "openmetrics"}}

    ``value`` is a JSON number. NaN, +Inf and -Inf are not JSON numbers: such a sample has
    ``"value": null`` and ``"value_text": "NaN" | "+Inf" | "-Inf"`` (Prometheus' own spelling);
    finite values have no ``value_text``. Histogram and summary samples keep their ``le`` and
    ``quantile`` labels as exposed (strings, e.g. ``"+Inf"``).

    Each target gets the target labels ``job`` and ``instance`` (the URL's host:port). When a
    scraped sample already has one, ``honor_labels`` decides as in Prometheus: true keeps the
    scraped value; false sets the target's and keeps the scraped one as ``exported_<name>``.

    Each target and scrape also yields an ``up`` document (type gauge, value 1 or 0; when 0,
    ``data.error`` says why). A body that is not Prometheus text is a dead letter naming the
    target, and its scrape is up 0; the capture goes on with the next target and scrape.
    """

    targets: list[str] = Field(min_length=1, description="URLs of /metrics endpoints.",
                               examples=[["${SOPHIA_METRICS_URL:-http://127.0.0.1:8701/metrics}"]])
    job: str | None = Field(default=None, description="The `job` label and each document's `source`; "
                                                      "the capture's name if unset.")
    honor_labels: bool = Field(default=False, description="On a label conflict keep the scraped value "
                                                          "(true) or rename it exported_<name> (false).")
    timeout: Duration = Field(default=10.0, gt=0, description="Limit of one scrape; no longer than the interval.")
    token: SecretStr | None = Field(
        default=None, description="Secret: bearer token for the targets, from the environment; empty = none.")
    advanced: PrometheusAdvanced = Field(default_factory=PrometheusAdvanced)

    @field_validator("targets")
    @classmethod
    def _urls(cls, targets: list[str]) -> list[str]:
        for target in targets:
            try:
                url = httpx.URL(target)
            except httpx.InvalidURL as e:
                raise ValueError(f"{target!r} is not a URL: {e}") from None
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(f"{target!r} is not an absolute http:// or https:// URL")
            if url.userinfo:
                raise ValueError(f"{url.host}: the URL carries credentials; use `token` (from the environment)")
        if len(set(targets)) != len(targets):
            raise ValueError("a target is listed twice")
        return targets

    def bearer(self) -> str:
        return self.token.get_secret_value() if self.token else ""


class PrometheusResource(Model):
    """Nothing to set: every sample of every target goes to the binding's collection."""


def check(catalog: Catalog, task: CaptureSpec, place: str) -> Problems:
    """One binding (the samples' collection), and a scrape that ends before the next one starts."""
    problems: Problems = []
    if len(task.bindings) != 1:
        problems.append((f"{place}.bindings", f"a prometheus capture writes one collection; "
                                              f"list one binding, not {len(task.bindings)}"))
    config: PrometheusConfig = task.config
    if config.timeout > task.interval:
        problems.append((f"{place}.endpoint.prometheus.timeout",
                         f"{config.timeout:g}s is longer than the interval ({task.interval:g}s)"))
    return problems
