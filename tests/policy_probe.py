"""A third-party connector for the runtime-policy tests: a capture and a materialization that break
their contracts (or fail) on purpose, as the ``behaviour`` of their config says, and a derivation
engine that raises.

It is not registered in pyproject.toml: ``install(site)`` writes the ``.dist-info`` of a package
that declares it in the ``localflow.connectors`` entry-point group, as any installed connector
package would, and the test puts ``site`` on ``sys.path``. It imports only ``pipeline.sdk``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.sdk.capture import Capture, Captured
from pipeline.sdk.config import Model
from pipeline.sdk.connector import Connector
from pipeline.sdk.engine import Engine, Transformed
from pipeline.sdk.errors import Backpressure, ConfigError, EndpointError
from pipeline.sdk.materialization import Applied, Batch, Materialization
from pipeline.sdk.records import TopicPartition

RUNS: dict[str, int] = {}
"""Runs started per task (a restart starts one more)."""
CALLS: dict[str, int] = {}
"""``apply`` calls per task (a batch retried after backpressure is applied again)."""


class ProbeConfig(Model):
    behaviour: Literal["config_error", "flaky", "stateless", "ok", "beyond", "backwards", "backpressure"] = "ok"
    documents: int = Field(default=3, ge=0)


class ProbeResource(Model):
    pass


class ProbeCapture(Capture):
    config: ProbeConfig

    async def open(self) -> None:
        RUNS[self.ctx.name] = RUNS.get(self.ctx.name, 0) + 1
        if self.config.behaviour == "config_error":
            raise ConfigError("the probe is misconfigured on purpose", f"captures.{self.ctx.name}.endpoint")
        if self.config.behaviour == "flaky" and RUNS[self.ctx.name] == 1:
            raise EndpointError("the probe's source is down on its first run")

    async def run(self, state: dict[str, Any] | None) -> AsyncIterator[Captured]:
        docs = [(0, {"metadata": {"id": f"{self.ctx.name}-{i}"}}) for i in range(self.config.documents)]
        yield Captured(documents=docs, state=None if self.config.behaviour == "stateless" else {"sent": len(docs)})
        while await self.ctx.sleep(0.05):
            pass


class ProbeMaterialization(Materialization):
    """Applies nothing anywhere; says its offsets are durable as its behaviour says."""

    config: ProbeConfig

    async def assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        return dict.fromkeys(partitions)

    async def apply(self, batch: Batch) -> Applied:
        CALLS[self.ctx.name] = CALLS.get(self.ctx.name, 0) + 1
        offsets = batch.next_offsets()
        if self.config.behaviour == "beyond":
            offsets = {tp: o + 10 for tp, o in offsets.items()}
        elif self.config.behaviour == "backwards" and CALLS[self.ctx.name] > 1:
            offsets = {tp: 0 for tp in offsets}
        elif self.config.behaviour == "backpressure" and CALLS[self.ctx.name] == 1:
            raise Backpressure("the probe's endpoint is busy", retry_after=0.2)
        counts: dict[int, int] = {}
        for r in batch.records:
            counts[batch.bindings[r.topic]] = counts.get(batch.bindings[r.topic], 0) + 1
        return Applied(offsets, documents=counts)


CAPTURE = Connector(name="probe", kind="capture", config=ProbeConfig, resource=ProbeResource, build=ProbeCapture)
MATERIALIZATION = Connector(name="probe-sink", kind="materialization", config=ProbeConfig, resource=ProbeResource,
                            build=ProbeMaterialization)


class ProbeEngine(Engine):
    """A derivation engine that breaks its contract: it raises on a batch instead of listing the bad
    input in ``failed``."""

    def apply(self, transform: int, documents: Sequence[dict[str, Any]]) -> Transformed:
        raise ZeroDivisionError("the probe engine divides by zero on purpose")


class ProbeEngines:
    """The engine module of the package (``build``, as ``transforms/<engine>.py`` exposes it)."""

    @staticmethod
    def build(catalog: Any, collection: str) -> Engine:
        return ProbeEngine()


ENGINE = ProbeEngines()


def install(site: Path) -> None:
    """Write the metadata of a package ``localflow-policy-probe`` that registers both connectors."""
    info = site / "localflow_policy_probe-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: localflow-policy-probe\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[localflow.connectors]\nprobe = tests.policy_probe:CAPTURE\n"
                                           "probe-sink = tests.policy_probe:MATERIALIZATION\n"
                                           "[localflow.engines]\nprobe = tests.policy_probe:ENGINE\n")
