"""The Sophia platform's enrichment as a Python transform (``transforms.sophia:enrich``).

The catalog runs the platform's SQL (examples/sophia/flow.yaml); this function computes the
same processed document, for deployments that prefer ``derive.using.python`` and as a second
implementation the SQL is tested against.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

PRIORITY = {"agent_interaction": "high", "system_metric": "medium"}
"""``data.type`` -> priority; every other type (or none) is ``low``."""


def enrich(raw: dict[str, Any]) -> dict[str, Any] | None:
    """A raw document -> its processed document; None when ``data`` is null (as the SQL's WHERE)."""
    data = raw.get("data")
    if data is None:
        return None
    metadata = raw.get("metadata")
    kind = data.get("type") if isinstance(data, dict) else None
    doc: dict[str, Any] = {
        "timestamp": raw.get("timestamp"),
        "source": raw.get("source"),
        "processed_data": data,
        "enrichments": {
            "priority": PRIORITY.get(kind, "low") if isinstance(kind, str) else "low",
            "processed_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }
    if isinstance(metadata, dict) and metadata.get("id") is not None:
        doc["id"] = metadata["id"]
    confidence = data.get("confidence") if isinstance(data, dict) else None
    if type(confidence) in (int, float) and 0 <= confidence <= 1:
        doc["confidence_score"] = confidence
    return doc
