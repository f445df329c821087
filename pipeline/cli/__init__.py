"""The `localflow` command line: one module per command, registered on ``app`` (pipeline/cli/app.py)."""

from pipeline.cli import demo, doctor, export, preview, replay, run, schema, status, testing, validate  # noqa: F401
from pipeline.cli.app import app, main

__all__ = ["app", "main"]
