"""Writing documents into a collection as a capture would (localflow's own writer: validated, keyed,
with the headers every record carries), for tests that feed a task what it reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.runtime.catalog import Catalog, load_catalog
from pipeline.runtime.collection import Collection, CollectionWriter, WriteResult


async def produce(catalog: Catalog | Path, collection: str, docs: list[dict[str, Any]], *,
                  dead: bool = False) -> WriteResult:
    """Write ``docs`` into ``collection`` of the catalog; each must be written, unless ``dead`` (the
    test writes invalid documents on purpose, which go to the dead-letter topic)."""
    cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    async with CollectionWriter(cat.kafka, "test-writer") as writer:
        result = await writer.write(Collection.from_catalog(cat, collection), docs)
    assert dead or result.written == len(docs), f"{collection}: {result.dead} of {len(docs)} documents were dead letters"
    return result
