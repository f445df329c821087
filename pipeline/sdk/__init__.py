"""What connectors and derivation engines may import, and nothing else of localflow.

This package imports nothing from the rest of ``pipeline`` and no Kafka, database or cloud
client: a connector that imports its contract does not import the runtime.
"""
