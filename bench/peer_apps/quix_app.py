"""Quix Streams: a Kafka topic of Sophia raw documents -> PostgreSQL (upsert), Redis or S3.

Run by the peers benchmark in Quix's own venv: ``python quix_app.py '<json settings>'``. The
document becomes the row ``doc_id, event_time, source, data, metadata``, plus Quix's own ``__key``
and ``timestamp`` (the Kafka time); the consumer's session timeout is the benchmark's.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def row(doc: dict[str, Any]) -> dict[str, Any]:
    return {"doc_id": doc["metadata"]["id"], "event_time": doc["timestamp"], "source": doc["source"],
            "data": doc["data"], "metadata": doc["metadata"]}


def sink(cfg: dict[str, Any]) -> Any:
    kind = cfg["sink"]
    if kind == "postgres":
        from quixstreams.sinks.community.postgresql import PostgreSQLSink

        pg = cfg["postgres"]
        return PostgreSQLSink(host=pg["host"], port=pg["port"], dbname=pg["dbname"], user=pg["user"],
                              password=pg["password"], table_name=cfg["table"], schema_auto_update=True,
                              upsert_on_primary_key=True, primary_key_columns=["doc_id"])
    if kind == "redis":
        from quixstreams.sinks.community.redis import RedisSink

        r = cfg["redis"]
        prefix = r["prefix"]
        return RedisSink(host=r["host"], port=r["port"], db=r.get("db", 0),
                         key_serializer=lambda key, value: f"{prefix}:{value['metadata']['id']}")
    if kind == "s3":
        from quixstreams.sinks.community.file.formats import JSONFormat
        from quixstreams.sinks.community.file.s3 import S3FileSink

        s = cfg["s3"]
        return S3FileSink(bucket=s["bucket"], aws_access_key_id=s["access_key"], aws_secret_access_key=s["secret_key"],
                          region_name="us-east-1", endpoint_url=s["endpoint_url"], directory=s["prefix"],
                          format=JSONFormat(compress=False))
    raise SystemExit(f"quix_app: unknown sink {kind!r}")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from quixstreams import Application

    app = Application(broker_address=cfg["bootstrap"], consumer_group=cfg["group"], auto_offset_reset="earliest",
                      consumer_extra_config={"session.timeout.ms": cfg["session_timeout_ms"]},
                      loglevel="WARNING", use_changelog_topics=False,
                      commit_interval=cfg.get("commit_interval", 5.0))  # 5 s: Quix's default
    topic = app.topic(cfg["topic"], value_deserializer="json", key_deserializer="bytes")
    sdf = app.dataframe(topic)
    if cfg["sink"] == "postgres":
        sdf = sdf.apply(row)
    sdf.sink(sink(cfg))
    app.run()


if __name__ == "__main__":
    main()
