"""S3 archive materialization: collections batched into compressed JSON-lines objects.

Only the config models are imported here (the registry imports every connector to list them);
the implementation is imported inside ``build`` and ``doctor``.
"""

from __future__ import annotations

from connectors.s3.config import S3Config, S3Resource
from pipeline.sdk.connector import Connector

CONNECTOR = Connector(
    name="s3",
    kind="materialization",
    config=S3Config,
    resource=S3Resource,
    build="connectors.s3.materialization:S3Materialization",
    doctor="connectors.s3.client:doctor",
)
