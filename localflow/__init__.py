"""``import localflow``: the platform-facing names (the implementation lives in ``pipeline``).

    import asyncio, localflow
    asyncio.run(localflow.setup_sophia())      # creates the Sophia catalog's tasks through the API
"""

from pipeline import __version__
from pipeline.control.client import (
    EstuaryClient,
    LocalflowAPIError,
    LocalflowClient,
    setup_sophia,
    setup_sophia_estuary_flow,
)

__all__ = ["EstuaryClient", "LocalflowAPIError", "LocalflowClient", "__version__", "setup_sophia",
           "setup_sophia_estuary_flow"]
