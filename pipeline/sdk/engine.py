"""The Engine contract: what a derivation engine (``transforms/<engine>``) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Document = dict[str, Any]


@dataclass(slots=True)
class Transformed:
    """What an engine made of one batch of one transform."""

    documents: list[Document] = field(default_factory=list)
    """Output documents, in input order (not yet validated: the writer does that)."""
    sources: list[int] = field(default_factory=list)
    """``sources[j]``: the index in the batch of the input ``documents[j]`` came from."""
    failed: list[tuple[int, str]] = field(default_factory=list)
    """``(index of the input document in the batch, why)`` for inputs the transform rejected."""

    def extend(self, other: Transformed, offset: int) -> None:
        """Append ``other``, whose input indexes start at ``offset`` of this batch."""
        self.documents.extend(other.documents)
        self.sources.extend(i + offset for i in other.sources)
        self.failed.extend((i + offset, why) for i, why in other.failed)


class Engine(ABC):
    """Runs the transforms of one derived collection over batches of source documents.

    Built once per worker by ``transforms.<engine>.build(catalog, collection)``; transform ``i``
    is ``derive.transforms[i]`` of the catalog. Documents are JSON objects (dicts), read back
    from the source collection (they were validated when written, and are not validated again).

    MUST: return from ``apply`` the outputs of every input it could transform, each with the
    index of the input it came from (``sources``: the output carries that input's source
    position, by which endpoints order a key's versions), in input order, and, in ``failed``,
    the index and reason of every input it could not; give the same input the same output keys
    every time (a batch is re-run after a crash). MUST NOT: raise for a bad input (the task would
    restart on the same batch forever), do I/O on Kafka, or rely on state kept between batches
    for correctness (state lives in the worker's memory and is lost on restart). All calls of one
    engine come from one thread, not the event loop's.
    """

    def open(self) -> None:  # noqa: B027 - optional hook
        """Once per worker, before the first batch (e.g. SQLite migrations)."""

    @abstractmethod
    def apply(self, transform: int, documents: Sequence[Document]) -> Transformed:
        """Transform one batch of documents of the transform's source."""

    def apply_json(self, transform: int, texts: Sequence[str]) -> Transformed | None:
        """Optional: ``apply`` to documents given as their JSON text (each a JSON object, as
        written), for an engine that reads JSON itself faster than Python decodes it. MUST give
        the same outputs as ``apply``; returns None to be given the decoded documents instead."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what ``open`` took."""
