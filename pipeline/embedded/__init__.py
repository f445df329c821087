"""Embedded services (Kafka, Postgres, Redis, S3 from pip or the system) and the demo."""
