"""Pathway: a Kafka topic of Sophia raw documents -> PostgreSQL, a snapshot table keyed by id.

Run by the peers benchmark in Pathway's own venv: ``python pathway_app.py '<json settings>'``.
The row is ``doc_id, event_time, source, data, metadata``, as for the other peers; the consumer's
session timeout is the benchmark's.
"""

import json
import sys

import pathway as pw  # no `from __future__ import annotations`: Pathway reads the schema's annotations


def main() -> None:
    cfg = json.loads(sys.argv[1])

    class Raw(pw.Schema):
        timestamp: str
        source: str
        data: pw.Json
        metadata: pw.Json

    rdkafka = {"bootstrap.servers": cfg["bootstrap"], "group.id": cfg["group"], "auto.offset.reset": "earliest",
               "session.timeout.ms": str(cfg["session_timeout_ms"])}
    raw = pw.io.kafka.read(rdkafka, topic=cfg["topic"], format="json", schema=Raw)
    rows = raw.select(doc_id=pw.this.metadata["id"].as_str(unwrap=True), event_time=pw.this.timestamp, source=pw.this.source,
                      data=pw.this.data, metadata=pw.this.metadata)
    pg = cfg["postgres"]
    settings = {"host": pg["host"], "port": str(pg["port"]), "dbname": pg["dbname"], "user": pg["user"],
                "password": pg["password"]}
    pw.io.postgres.write(rows, settings, cfg["table"], output_table_type="snapshot", primary_key=[rows.doc_id],
                         init_mode="create_if_not_exists")
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)


if __name__ == "__main__":
    main()
