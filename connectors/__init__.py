"""The connectors shipped with localflow: one sub-package each, whose ``__init__`` exposes ``CONNECTOR``.

Each is registered by an entry point in pyproject.toml (``localflow.connectors``); the runtime finds
them there (pipeline/runtime/registry.py), never by importing this package. A connector imports
only ``pipeline.sdk``.
"""
