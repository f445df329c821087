"""Telemetry: Prometheus metrics, the HTTP server (/metrics /healthz /readyz /status) and logs."""
