"""The catalog: one YAML file (default ``flow.yaml``) that declares collections and tasks.

Loading reports every problem of the file in one pass, each at its ``file:line:column``:
1. YAML (ruamel.yaml, YAML 1.2: positions kept, duplicate keys are errors), then ``${VAR}`` /
   ``${VAR:-default}`` interpolation from the environment, then schema files;
2. pydantic models with unknown fields forbidden; an entry that fails is set aside (its problems
   reported) so that the rest is still checked;
3. cross-references: each connector validates its own config and resources (looked up in the
   registry by name, so this module never changes when a connector is added), schemas against
   their JSON Schema meta-schema, keys point at required scalar properties, bindings name declared
   collections, derivations compile.
A misspelled name gets a "did you mean" from the model's own fields, and the list of valid ones.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)

from pipeline.sdk.config import Duration, Model
from pipeline.sdk.errors import ConfigError
from pipeline.sdk.pointers import resolve_pointer
from pipeline.sdk.problems import Problem, closest, join, jsonable, pydantic_problems

# ---------------------------------------------------------------------------- interpolation

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


def interpolate(node: Any, env: dict[str, str], place: str, problems: list[tuple[str, str]]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``."""
    if isinstance(node, dict):
        return {k: interpolate(v, env, join(place, str(k)), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, f"{place}[{i}]", problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, has_default, default = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if value is None or (value == "" and has_default):
            if has_default is not None:
                return default or ""
            problems.append((place, f"environment variable {name} is not set (write ${{{name}:-default}} for a default)"))
            return ""
        return value

    return _VAR.sub(repl, node)



# ---------------------------------------------------------------------------- models


class KafkaConfig(Model):
    """How to reach the broker that stores collections (Apache Kafka, Redpanda, Tansu...)."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="Comma-separated host:port list; ${KAFKA_BOOTSTRAP_SERVERS} in the Sophia catalog.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How clients talk to the broker: plain TCP, TLS, SASL, or SASL over TLS.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism, with SASL_PLAINTEXT or SASL_SSL.")
    sasl_username: str | None = Field(default=None, description="SASL user name.", examples=["${KAFKA_USERNAME}"])
    sasl_password: SecretStr | None = Field(default=None, description="Secret: from the environment only.",
                                            examples=["${KAFKA_PASSWORD}"])
    ssl_cafile: str | None = Field(default=None, description="CA bundle for SSL / SASL_SSL.")
    client_id: str = Field(default="localflow", description="Client id the broker logs and quotas see.")
    max_message_bytes: int = Field(
        default=1024 * 1024, ge=64 * 1024,
        description="The largest record the broker accepts (its message.max.bytes; Apache Kafka's default, "
                    "1 MiB, unless raised). A larger document becomes a dead letter that fits, never a stuck task.")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka producers, consumers and admin clients."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.sasl_mechanism:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        if self.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            opts["ssl_context"] = ssl.create_default_context(cafile=self.ssl_cafile)
        return opts


class TransformSpec(Model):
    """One transform of a derivation: documents of ``source`` go through ``lambda``."""

    name: str = Field(description="Names the transform in dead letters and metrics.", examples=["enrich"])
    source: str = Field(description="The collection read by this transform.", examples=["sophia/sophia_raw_data"])
    lambda_: str = Field(alias="lambda", description="SQL for sqlite (the source is a table named by the "
                         "collection's last segment), `module:function` for python.",
                         examples=["SELECT id, data FROM sophia_raw_data", "transforms.sophia:enrich"])


class DeriveSpec(Model):
    """How a derived collection is computed; ``using`` names the engine and its options."""

    using: dict[str, dict[str, Any]] = Field(
        description="Exactly one engine and its options: {sqlite: {migrations: [...]}}, {python: {}}, or an installed "
                    "engine's name (a package with a `localflow.engines` entry point).",
        examples=[{"sqlite": {}}, {"python": {}}],
    )
    transforms: list[TransformSpec] = Field(min_length=1, description="The transforms; each reads one collection.",
                                            examples=[[{"name": "enrich", "source": "sophia/sophia_raw_data",
                                                        "lambda": "SELECT * FROM sophia_raw_data"}]])

    @field_validator("using")
    @classmethod
    def _one_engine(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) != 1:
            raise ValueError(f"name exactly one engine (e.g. sqlite or python), got {sorted(v) or 'none'}")
        return {k: (o or {}) for k, o in v.items()}

    @property
    def engine(self) -> str:
        return next(iter(self.using))

    @property
    def options(self) -> dict[str, Any]:
        return next(iter(self.using.values()))


class CollectionSpec(Model):
    """A named, append-only stream of JSON documents, stored as one Kafka topic."""

    schema_: dict[str, Any] | str = Field(
        alias="schema", description="Inline JSON Schema (draft 2020-12 unless `$schema` says otherwise) or a file "
        "relative to the catalog.", examples=["schemas/raw.schema.yaml"])
    key: list[str] = Field(min_length=1, description="JSON pointers to the document's key: required scalar "
                           "properties.", examples=[["/metadata/id"]])
    partitions: int = Field(default=1, ge=1, le=1000, description="Kafka partitions of the topic.")
    replication_factor: int = Field(default=1, ge=1, le=32, description="Kafka replicas of each partition.")
    retention: Duration | None = Field(
        default=None, gt=0,
        description="How long the broker keeps the topic's records (retention.ms, set when the topic is "
                    "created). Unset: forever, which replay and rebuilding an endpoint from the collections "
                    "rely on. A materialization that falls behind the retention stops with an offset gap.")
    derive: DeriveSpec | None = Field(default=None, description="Makes this a derivation: how it is computed.")

    @field_validator("key")
    @classmethod
    def _pointers(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/") or p == "/":
                raise ValueError(f"{p!r} is not a JSON pointer to a property (write e.g. /metadata/id)")
        return v


class CaptureBinding(Model):
    """Where a capture's resource (an API path, a glob, a target list) lands."""

    resource: dict[str, Any] = Field(default_factory=dict, description="What to read, in the connector's "
                                     "resource model (see the connector's section).")
    target: str = Field(description="The collection the documents are written into.",
                        examples=["sophia/sophia_raw_data"])
    mask: list[str] = Field(
        default_factory=list,
        description="JSON pointers whose values are replaced by a keyed hash before writing.",
        examples=[["/data/user_email"]],
    )
    _resource: Any = PrivateAttr(default=None)

    @property
    def parsed(self) -> Any:
        """The resource validated by the connector's resource model."""
        return self._resource


class MaterializationBinding(Model):
    """Which collection feeds which endpoint resource (table, key prefix, archive prefix)."""

    source: str = Field(description="The collection materialized.", examples=["sophia/sophia_processed_data"])
    resource: dict[str, Any] = Field(default_factory=dict, description="Where it goes, in the connector's "
                                     "resource model (see the connector's section).")
    _resource: Any = PrivateAttr(default=None)

    @property
    def parsed(self) -> Any:
        return self._resource


class _TaskSpec(Model):
    endpoint: dict[str, dict[str, Any]] = Field(description="Exactly one connector: {<connector>: {...}}.",
                                                examples=[{"http": {"url": "https://api.example.com/v1"}}])
    _config: Any = PrivateAttr(default=None)
    _name: str = PrivateAttr(default="")

    @field_validator("endpoint", mode="before")
    @classmethod
    def _one_connector(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if len(v) != 1:
                raise ValueError(f"name exactly one connector, got {sorted(v) or 'none'}")
            return {k: (c if c is not None else {}) for k, c in v.items()}
        return v

    @property
    def connector(self) -> str:
        return next(iter(self.endpoint))

    @property
    def config(self) -> Any:
        """The endpoint config validated by the connector's own model."""
        return self._config

    @property
    def name(self) -> str:
        return self._name


class CaptureSpec(_TaskSpec):
    """A task that reads a source and writes documents into its bindings' collections."""

    interval: Duration = Field(default=60.0, description="How often to poll the source.")
    bindings: list[CaptureBinding] = Field(min_length=1, description="Which collections it writes, and from what.",
                                           examples=[[{"target": "sophia/sophia_raw_data", "resource": {"path": "/v1"}}]])


class MaterializationSpec(_TaskSpec):
    """A task that keeps an endpoint in step with its bindings' collections."""

    bindings: list[MaterializationBinding] = Field(
        min_length=1, description="Which collections it keeps, and where.",
        examples=[[{"source": "sophia/sophia_processed_data", "resource": {"table": "sophia_processed_data"}}]])


class IngestStep(Model):
    """Documents written into a collection, validated as a capture's would be."""

    collection: str = Field(description="The collection written.", examples=["sophia/sophia_raw_data"])
    documents: list[dict[str, Any]] = Field(description="The documents, in order.",
                                            examples=[[{"id": "a", "data": {}}]])


class VerifyStep(Model):
    """What a collection must hold, per key: only the properties each expected document states."""

    collection: str = Field(description="The collection read.", examples=["sophia/sophia_processed_data"])
    documents: list[dict[str, Any]] = Field(description="The expected documents (last per key).",
                                            examples=[[{"id": "a", "enrichments": {"priority": "high"}}]])


class TestStep(Model):
    """One step of a catalog test: ``ingest`` documents, or ``verify`` what a derivation made."""

    ingest: IngestStep | None = Field(default=None, description="Write these documents.")
    verify: VerifyStep | None = Field(default=None, description="Wait for, then compare, these documents.")
    description: str | None = Field(default=None, description="What the step shows, for the report.")


class Catalog(Model):
    """The whole catalog file, interpolated, validated and cross-checked."""

    kafka: KafkaConfig = Field(default_factory=KafkaConfig, description="The broker that stores collections.")
    collections: dict[str, CollectionSpec] = Field(description="Collections and derivations, by name "
                                                   "(`/` becomes `.` in the topic).", examples=[{"acme/events": {
                                                       "schema": "schemas/events.yaml", "key": ["/id"]}}])
    captures: dict[str, CaptureSpec] = Field(default_factory=dict, description="Capture tasks, by name.")
    materializations: dict[str, MaterializationSpec] = Field(default_factory=dict,
                                                             description="Materialization tasks, by name.")
    tests: dict[str, list[TestStep]] = Field(default_factory=dict, description="`localflow test` cases, by name.")
    _path: Path | None = PrivateAttr(default=None)
    _declared: set[str] = PrivateAttr(default_factory=set)
    """Every collection the file declares, including those set aside as invalid."""

    @field_validator("captures", "materializations", "tests", mode="before")
    @classmethod
    def _empty_section(cls, v: Any) -> Any:
        return {} if v is None else v

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def derivations(self) -> dict[str, CollectionSpec]:
        return {n: c for n, c in self.collections.items() if c.derive is not None}

    def task_names(self) -> list[str]:
        """Every runnable task: captures, derivations, materializations."""
        return [*self.captures, *self.derivations, *self.materializations]

    def schema(self, collection: str) -> dict[str, Any]:
        """The collection's JSON Schema (files are resolved at load time)."""
        s = self.collections[collection].schema_
        assert isinstance(s, dict)
        return s


# ---------------------------------------------------------------------------- loading

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-./]*$")
_SCALARS = {"string", "integer", "number", "boolean"}


def topic_of(collection: str) -> str:
    """The Kafka topic of a collection: ``/`` becomes ``.`` (``sophia/x`` -> ``sophia.x``)."""
    return collection.replace("/", ".")


def schema_fingerprint(schema: dict[str, Any]) -> str:
    """A short, stable id of a schema, carried in each message's headers."""
    return hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]



class CatalogError(ConfigError):
    """A catalog with problems: ``problems`` are :class:`Problem` pairs, each with its position."""

    problems: list[Problem]

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__(list(problems))
        self.args = ("\n".join(str(p) for p in problems),)

    def __str__(self) -> str:
        return self.args[0]


# ---------------------------------------------------------------------------- YAML with positions

Mark = tuple[str, int, int]
"""(file, line, column), 1-based."""


class Positions:
    """Where each place of a loaded file is: its value, and its key when it is a mapping entry."""

    def __init__(self) -> None:
        self.values: dict[str, Mark] = {}
        self.keys: dict[str, Mark] = {}

    def find(self, place: str, at_key: bool = False) -> Mark | None:
        """The position of ``place`` or of its nearest enclosing place that has one."""
        while True:
            mark = (self.keys.get(place) if at_key else None) or self.values.get(place) or self.keys.get(place)
            if mark is not None or not place:
                return mark
            cut = max(place.rfind("."), place.rfind("["))
            place = place[:cut] if cut > 0 else ""


_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MERGE = "tag:yaml.org,2002:merge"


def read_yaml(text: str, file: str, place: str = "", positions: Positions | None = None,
              problems: list[tuple[str, str]] | None = None) -> Any:
    """Parse YAML 1.2 into plain JSON-like values, recording the position of every place in
    ``positions`` and each duplicate key in ``problems`` (YAML forbids them; PyYAML kept the last
    one silently). Dates stay the strings they were written as: JSON has no date type.
    Raises CatalogError, at the position, when the text is not YAML."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    positions = Positions() if positions is None else positions
    problems = [] if problems is None else problems
    yaml = YAML(typ="safe", pure=True)
    try:
        root = yaml.compose(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = Problem(place, f"not valid YAML: {e.problem or e}" + (f" ({e.context})" if e.context else ""))
        if mark is not None:
            problem.file, problem.line, problem.column = file, mark.line + 1, mark.column + 1
        else:
            problem.file = file
        raise CatalogError([problem]) from None

    def mark(node: Any) -> Mark:
        return (file, node.start_mark.line + 1, node.start_mark.column + 1)

    def scalar(node: Any) -> Any:
        return node.value if node.tag == _TIMESTAMP else yaml.constructor.construct_object(node, deep=True)

    def build(node: Any, at: str) -> Any:
        positions.values.setdefault(at, mark(node))
        if node.id == "scalar":
            return scalar(node)
        if node.id == "sequence":
            return [build(item, f"{at}[{i}]") for i, item in enumerate(node.value)]
        out: dict[Any, Any] = {}
        seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:  # `<<: *defaults`: the anchored mapping(s), then this one's keys
                merged = build(value_node, at)
                for m in merged if isinstance(merged, list) else [merged]:
                    if isinstance(m, dict):
                        out = {**m, **out}
                continue
            if key_node.id != "scalar":
                bad = Problem(at, f"a mapping key must be a scalar, not a {key_node.id}")
                bad.file, bad.line, bad.column = mark(key_node)
                problems.append(bad)
                continue
            key = scalar(key_node)
            child = join(at, str(key))
            if key in seen:
                dup = Problem(child, f"duplicate key {str(key)!r} (first at line {seen[key].start_mark.line + 1}); "
                              "YAML allows each key once: remove one", at_key=True)
                dup.file, dup.line, dup.column = mark(key_node)
                problems.append(dup)
            else:
                seen[key] = key_node
                positions.keys[child] = mark(key_node)
                positions.values[child] = mark(value_node)
            out[key] = build(value_node, child)
        return out

    return None if root is None else build(root, place)


# ---------------------------------------------------------------------------- loading


def load_catalog(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Catalog:
    """Load, interpolate, validate and cross-check a catalog file.

    Raises CatalogError listing every problem with its position and place, e.g.
    ``flow.yaml:12:15: captures.sophia/metrics.interval: '30x' is not a duration``.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        problem = Problem("", f"cannot read catalog: {why}")
        problem.file = str(file)
        raise CatalogError([problem]) from e
    positions = Positions()
    problems: list[tuple[str, str]] = []
    raw = read_yaml(text, str(file), "", positions, problems)
    if not isinstance(raw, dict):
        problem = Problem("", "a catalog is a mapping with `collections`, `captures`, `materializations`")
        problem.file = str(file)
        raise CatalogError([problem])
    before = len(problems)
    raw = interpolate(raw, dict(os.environ if env is None else env), "", problems)
    unset = {place for place, _ in problems[before:]}  # their empty value is not a second problem
    interpolated = len(problems)
    unreadable = _resolve_schema_files(raw, file.parent, positions, problems)
    catalog = _validate_models(raw, problems, unreadable)
    catalog._path = file.resolve()
    check_catalog(catalog, problems)
    for name in sorted(catalog._declared - set(catalog.collections) - unreadable):  # set aside: still check
        spec = raw["collections"][name]
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            problems.extend(schema_problems(spec["schema"], f"collections.{name}.schema"))
    problems = [p for i, p in enumerate(problems) if not (i >= interpolated and p[0] in unset)]
    if problems:
        raise CatalogError(locate(problems, positions, str(file)))
    return catalog


def locate(problems: Sequence[tuple[str, str]], positions: Positions, file: str) -> list[Problem]:
    """Each problem once, with its position, in file order (problems of one place keep their order)."""
    out: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for pair in problems:
        if tuple(pair) in seen:
            continue
        seen.add(tuple(pair))
        problem = Problem.of(pair)
        if not problem.file:
            problem.file, problem.line, problem.column = positions.find(problem.place, problem.at_key) or (file, 0, 0)
        out.append(problem)
    return sorted(out, key=lambda p: (p.file != file, p.file, p.line, p.column))


_SECTIONS = ("collections", "captures", "materializations", "tests")


def _validate_models(raw: dict[str, Any], problems: list[tuple[str, str]], set_aside: set[str]) -> Catalog:
    """The Catalog model of ``raw``; an entry (a collection, a task, a test) or a top-level field that
    fails is reported and set aside, as are the collections in ``set_aside`` (already reported), so
    the rest is validated and cross-checked in the same pass."""
    data = dict(raw)
    for section in _SECTIONS:
        if isinstance(data.get(section), dict):
            data[section] = dict(data[section])
    declared = set(data["collections"]) if isinstance(data.get("collections"), dict) else set()
    for name in set_aside:
        del data["collections"][name]
    for _ in range(sum(len(v) for v in data.values() if isinstance(v, dict)) + len(data) + 2):
        try:
            catalog = Catalog.model_validate(data)
        except ValidationError as e:
            problems.extend(pydantic_problems(e, "", Catalog))
            for err in e.errors(include_url=False):
                loc = err["loc"]
                section = data.get(loc[0]) if loc else None
                if len(loc) >= 2 and loc[0] in _SECTIONS and isinstance(section, dict):
                    section.pop(loc[1], None)  # that entry only (it may be gone already: two errors in it)
                elif loc and loc[0] == "collections":
                    data["collections"] = {}  # required: an empty one checks the rest
                elif loc:
                    data.pop(loc[0], None)
            continue
        catalog._declared = declared
        return catalog
    raise AssertionError("catalog validation did not converge")  # each round removes at least one entry


def _resolve_schema_files(raw: dict[str, Any], base: Path, positions: Positions,
                          problems: list[tuple[str, str]]) -> set[str]:
    """Replace each ``schema: file`` by the file's schema; the names of collections whose file failed."""
    failed: set[str] = set()
    collections = raw.get("collections")
    if not isinstance(collections, dict):
        return failed
    for name, spec in collections.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), str):
            continue
        place = f"collections.{name}.schema"
        file = base / spec["schema"]
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            problems.append(Problem(place, f"cannot read schema file {file}: {why}", value=spec["schema"], has_value=True))
            failed.add(name)
            continue
        try:
            loaded = read_yaml(text, str(file), place, positions, problems)
        except CatalogError as e:
            problems.extend(e.problems)
            failed.add(name)
            continue
        if not isinstance(loaded, dict):
            problems.append((place, f"schema file {file} does not hold a JSON Schema object"))
            failed.add(name)
            continue
        spec["schema"] = loaded
    return failed


def check_catalog(catalog: Catalog, problems: list[tuple[str, str]]) -> None:
    """Cross-checks that pydantic cannot express; appends to ``problems``. A reference to a collection
    that is declared but was set aside as invalid is not reported again (its own problems are)."""
    from pipeline.runtime.registry import check_derivation, known_connectors, known_engines, load_connector

    declared = catalog._declared | set(catalog.collections)

    def undeclared(name: str, place: str) -> None:
        if name not in declared:
            names = sorted(declared)
            problems.append(Problem(place, f"{name!r} is not a declared collection", value=name, has_value=True,
                                    did_you_mean=closest(name, names), valid=names))

    for name, coll in catalog.collections.items():
        place = f"collections.{name}"
        topic = topic_of(name)
        if not _NAME.match(name) or ".." in name or len(topic) > 240:
            problems.append((place, f"{name!r} is not a valid collection name (letters, digits, _ - . /)"))
        schema = coll.schema_
        assert isinstance(schema, dict)
        found = schema_problems(schema, f"{place}.schema")
        if found:
            problems.extend(found)
            continue
        for i, pointer in enumerate(coll.key):
            why = key_problem(schema, pointer)
            if why:
                problems.append(Problem(f"{place}.key[{i}]", why, value=pointer, has_value=True))

    for kind, tasks in (("captures", catalog.captures), ("materializations", catalog.materializations)):
        for name, task in tasks.items():
            task._name = name
            place = f"{kind}.{name}"
            connector_name = task.connector
            try:
                connector = load_connector(connector_name)
            except KeyError:
                known = known_connectors(kind[:-1])
                problems.append(Problem(f"{place}.endpoint.{connector_name}", f"unknown connector {connector_name!r}",
                                        did_you_mean=closest(connector_name, known), valid=known, at_key=True,
                                        reference=f"{kind[:-1]}-connectors"))
                continue
            if connector.kind != kind[:-1]:
                problems.append(Problem(f"{place}.endpoint.{connector_name}",
                                        f"{connector_name!r} is a {connector.kind} connector, not a {kind[:-1]}; "
                                        f"{kind}: {', '.join(known_connectors(kind[:-1]))}", at_key=True))
                continue
            try:
                task._config = connector.config.model_validate(task.endpoint[connector_name])
            except ValidationError as e:
                problems.extend(pydantic_problems(e, f"{place}.endpoint.{connector_name}", connector.config))
            for i, binding in enumerate(task.bindings):
                bplace = f"{place}.bindings[{i}]"
                coll_name = binding.target if kind == "captures" else binding.source
                undeclared(coll_name, f"{bplace}.{'target' if kind == 'captures' else 'source'}")
                try:
                    binding._resource = connector.resource.model_validate(binding.resource)
                except ValidationError as e:
                    problems.extend(pydantic_problems(e, f"{bplace}.resource", connector.resource))
                for j, pointer in enumerate(getattr(binding, "mask", [])):
                    if not pointer.startswith("/"):
                        problems.append(Problem(f"{bplace}.mask[{j}]", f"{pointer!r} is not a JSON pointer",
                                                value=pointer, has_value=True))
            if connector.check is not None and task._config is not None:
                problems.extend(connector.check(catalog, task, place))

    engines = known_engines()
    for name, coll in catalog.derivations.items():
        assert coll.derive is not None
        place = f"collections.{name}.derive"
        for i, t in enumerate(coll.derive.transforms):
            undeclared(t.source, f"{place}.transforms[{i}].source")
        if coll.derive.engine not in engines:
            problems.append(Problem(f"{place}.using.{coll.derive.engine}", f"unknown engine {coll.derive.engine!r}",
                                    did_you_mean=closest(coll.derive.engine, engines), valid=engines, at_key=True))
        elif all(t.source in catalog.collections for t in coll.derive.transforms):
            problems.extend(check_derivation(catalog, name, place))

    for name, steps in catalog.tests.items():
        for i, step in enumerate(steps):
            if (step.ingest is None) == (step.verify is None):
                problems.append((f"tests.{name}[{i}]", "a step is exactly one of `ingest` or `verify`"))
                continue
            which = "ingest" if step.ingest is not None else "verify"
            undeclared((step.ingest or step.verify).collection,  # type: ignore[union-attr]
                       f"tests.{name}[{i}].{which}.collection")


_META_SCHEMAS = {
    "https://json-schema.org/draft/2020-12/schema", "https://json-schema.org/draft/2019-09/schema",
    "http://json-schema.org/draft-07/schema", "http://json-schema.org/draft-06/schema",
    "http://json-schema.org/draft-04/schema",
}
_DEFAULT_META = "https://json-schema.org/draft/2020-12/schema"
_JSON_TYPES = ["array", "boolean", "integer", "null", "number", "object", "string"]


def schema_problems(schema: dict[str, Any], place: str) -> list[Problem]:
    """What is wrong with a JSON Schema, each at its place inside the schema with the offending
    value: checked against the meta-schema it declares (2020-12 when it declares none), then
    compiled as the collection writer compiles it (which catches e.g. a bad regex)."""
    import jsonschema_rs

    declared = schema.get("$schema", _DEFAULT_META)
    meta = declared.rstrip("#") if isinstance(declared, str) else declared
    if meta not in _META_SCHEMAS:
        return [Problem(f"{place}.$schema", f"unknown JSON Schema dialect {declared!r}", value=declared,
                        has_value=True, valid=sorted(_META_SCHEMAS))]
    out = []
    for e in _meta_validator(meta).iter_errors(schema):
        where = place
        for part in e.instance_path:
            where = f"{where}[{part}]" if isinstance(part, int) else join(where, str(part))
        if e.instance_path and e.instance_path[-1] == "type" and isinstance(e.instance, str):
            out.append(Problem(where, f"{e.instance!r} is not a JSON Schema type", value=e.instance, has_value=True,
                               did_you_mean=closest(e.instance, _JSON_TYPES), valid=_JSON_TYPES))
        else:
            out.append(Problem(where, f"not a valid JSON Schema: {e.message}", value=jsonable(e.instance),
                               has_value=True))
    if not out:
        from pipeline.runtime.collection import compile_schema

        try:
            compile_schema(schema)
        except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as e:
            where = place
            for part in getattr(e, "instance_path", []) or []:
                where = f"{where}[{part}]" if isinstance(part, int) else join(where, str(part))
            message = getattr(e, "message", None) or str(e).splitlines()[0]
            out.append(Problem(where, f"not a valid JSON Schema: {message}",
                               value=jsonable(getattr(e, "instance", None)), has_value=hasattr(e, "instance")))
    return out


_META_VALIDATORS: dict[str, Any] = {}


def _meta_validator(meta: str) -> Any:
    """A validator of schemas of one dialect (its meta-schema ships inside jsonschema-rs: no network)."""
    v = _META_VALIDATORS.get(meta)
    if v is None:
        import jsonschema_rs

        v = _META_VALIDATORS[meta] = jsonschema_rs.validator_for({"$schema": meta, "$ref": meta})
    return v


def key_problem(schema: dict[str, Any], pointer: str) -> str:
    """Why ``pointer`` cannot be a key of documents of ``schema`` ('' when it can)."""
    node, why = resolve_pointer(schema, pointer)
    if node is None:
        return why
    types = node.get("type")
    types = {types} if isinstance(types, str) else set(types or [])
    if not types or not types <= _SCALARS:
        return f"{pointer!r} must point at a scalar (string, integer, number, boolean), not {sorted(types) or 'an untyped value'}"
    return ""
