"""localflow's runtime: catalog, collections, checkpoints, tasks and the CLI.

Nothing in this package knows a particular endpoint; connectors live in ``connectors/``.
"""

__version__ = "0.1.0"
