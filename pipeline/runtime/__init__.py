"""The runtime: catalog, collections, checkpoints, the supervisor and the tasks that drive connectors."""
