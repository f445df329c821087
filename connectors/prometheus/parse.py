"""From an exposition body to samples, with Prometheus' label rules and a JSON-safe value form."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

OPENMETRICS = "application/openmetrics-text"


class NotExposition(ValueError):
    """The body is neither Prometheus text format nor OpenMetrics (it becomes a dead letter)."""


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    type: str
    labels: dict[str, str]
    value: float | None
    timestamp: float | None
    """Seconds since the epoch when the exposition gives one, else None (the scrape time applies)."""


def parse(body: bytes, content_type: str) -> tuple[str, list[Sample]]:
    """The format (``openmetrics`` or ``text``, chosen by Content-Type) and every sample of ``body``."""
    media = content_type.split(";", 1)[0].strip().lower()
    fmt = "openmetrics" if media == OPENMETRICS else "text"
    parser = parse_openmetrics if fmt == "openmetrics" else parse_text
    try:
        samples = [
            Sample(s.name, family.type, s.labels, s.value, None if s.timestamp is None else float(s.timestamp))
            for family in parser(body.decode("utf-8"))
            for s in family.samples
        ]
    except (ValueError, TypeError, IndexError, KeyError) as e:  # the parsers' ways of saying "not metrics"
        shown = content_type or "no Content-Type"
        raise NotExposition(f"the body is not Prometheus {fmt} format ({shown}): {e}") from e
    return fmt, samples


def value_fields(value: float | None) -> dict[str, Any]:
    """``{"value": number}``, or ``{"value": None, "value_text": "NaN"|"+Inf"|"-Inf"}`` (not JSON numbers)."""
    if value is None:
        return {"value": None}
    v = float(value)
    if math.isnan(v):
        return {"value": None, "value_text": "NaN"}
    if math.isinf(v):
        return {"value": None, "value_text": "+Inf" if v > 0 else "-Inf"}
    return {"value": v}


def with_target_labels(scraped: dict[str, str], target: dict[str, str], honor_labels: bool) -> dict[str, str]:
    """Prometheus' merge of target labels into a sample's labels (``honor_labels``), empty values dropped."""
    labels = dict(scraped)
    for name, value in target.items():
        existing = labels.get(name, "")
        if honor_labels:
            if name not in labels:
                labels[name] = value
            continue
        if existing:
            exported = "exported_" + name
            while labels.get(exported):
                exported = "exported_" + exported
            labels[exported] = existing
        labels[name] = value
    return {k: v for k, v in labels.items() if v != ""}


def series_id(target: str, name: str, labels: dict[str, str], timestamp_ms: int) -> str:
    """Deterministic id of a sample: the same series at the same time from the same target."""
    canonical = orjson.dumps([target, name, sorted(labels.items()), timestamp_ms])
    return hashlib.sha256(canonical).hexdigest()
