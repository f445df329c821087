"""The catalog: one YAML file (default ``flow.yaml``) that declares collections and tasks.

Loading is three passes, each reporting every problem it finds with its place in the file:
1. YAML, then ``${VAR}`` / ``${VAR:-default}`` interpolation from the environment;
2. pydantic models with unknown fields forbidden;
3. cross-references: each connector validates its own config and resources (looked up in the
   registry by name, so this module never changes when a connector is added), keys point at
   required scalar properties, bindings name declared collections, derivations compile.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
)

from pipeline.errors import ConfigError

# ---------------------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``30s``, ``5m``, ``1h30m``, ``250ms`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is not a duration (negative)")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if text and pos == len(text):
            return total
    raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 30s, 5m, 1h)")


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, written in the catalog as ``30s``, ``5m``, ``1h`` or a number."""

# ---------------------------------------------------------------------------- interpolation

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


def interpolate(node: Any, env: dict[str, str], place: str, problems: list[tuple[str, str]]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``."""
    if isinstance(node, dict):
        return {k: interpolate(v, env, _join(place, str(k)), problems) for k, v in node.items()}
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


def _join(place: str, part: str) -> str:
    return f"{place}.{part}" if place else part


# ---------------------------------------------------------------------------- models


class Model(BaseModel):
    """Base of every catalog and connector model: unknown fields are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class KafkaConfig(Model):
    """How to reach the broker that stores collections (Apache Kafka, Redpanda, Tansu...)."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="Comma-separated host:port list; ${KAFKA_BOOTSTRAP_SERVERS} in the Sophia catalog.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = Field(default=None, description="Secret: from the environment only.")
    ssl_cafile: str | None = Field(default=None, description="CA bundle for SSL / SASL_SSL.")
    client_id: str = "localflow"
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

    name: str = Field(description="Names the transform in dead letters and metrics.")
    source: str = Field(description="The collection read by this transform.")
    lambda_: str = Field(alias="lambda", description="SQL for sqlite, `module:function` for python.")


class DeriveSpec(Model):
    """How a derived collection is computed; ``using`` names the engine and its options."""

    using: dict[Literal["sqlite", "python"], dict[str, Any]] = Field(
        description="Exactly one engine: {sqlite: {migrations: [...]}} or {python: {}}."
    )
    transforms: list[TransformSpec] = Field(min_length=1)

    @field_validator("using")
    @classmethod
    def _one_engine(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) != 1:
            raise ValueError(f"name exactly one engine (sqlite or python), got {sorted(v) or 'none'}")
        return {k: (o or {}) for k, o in v.items()}

    @property
    def engine(self) -> str:
        return next(iter(self.using))

    @property
    def options(self) -> dict[str, Any]:
        return next(iter(self.using.values()))


class CollectionSpec(Model):
    """A named, append-only stream of JSON documents, stored as one Kafka topic."""

    schema_: dict[str, Any] | str = Field(alias="schema", description="Inline JSON Schema or a relative file.")
    key: list[str] = Field(min_length=1, description="JSON pointers to the document's key.")
    partitions: int = Field(default=1, ge=1, le=1000, description="Kafka partitions of the topic.")
    replication_factor: int = Field(default=1, ge=1, le=32)
    retention: Duration | None = Field(
        default=None, gt=0,
        description="How long the broker keeps the topic's records (retention.ms, set when the topic is "
                    "created). Unset: forever, which replay and rebuilding an endpoint from the collections "
                    "rely on. A materialization that falls behind the retention stops with an offset gap.")
    derive: DeriveSpec | None = None

    @field_validator("key")
    @classmethod
    def _pointers(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/") or p == "/":
                raise ValueError(f"{p!r} is not a JSON pointer to a property (write e.g. /metadata/id)")
        return v


class CaptureBinding(Model):
    """Where a capture's resource (an API path, a glob, a target list) lands."""

    resource: dict[str, Any] = Field(default_factory=dict)
    target: str
    mask: list[str] = Field(
        default_factory=list,
        description="JSON pointers whose values are replaced by a keyed hash before writing.",
    )
    _resource: Any = PrivateAttr(default=None)

    @property
    def parsed(self) -> Any:
        """The resource validated by the connector's resource model."""
        return self._resource


class MaterializationBinding(Model):
    """Which collection feeds which endpoint resource (table, key prefix, archive prefix)."""

    source: str
    resource: dict[str, Any] = Field(default_factory=dict)
    _resource: Any = PrivateAttr(default=None)

    @property
    def parsed(self) -> Any:
        return self._resource


class _TaskSpec(Model):
    endpoint: dict[str, dict[str, Any]] = Field(description="Exactly one connector: {<connector>: {...}}.")
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
    bindings: list[CaptureBinding] = Field(min_length=1)


class MaterializationSpec(_TaskSpec):
    """A task that keeps an endpoint in step with its bindings' collections."""

    bindings: list[MaterializationBinding] = Field(min_length=1)


class IngestStep(Model):
    collection: str
    documents: list[dict[str, Any]]


class VerifyStep(Model):
    collection: str
    documents: list[dict[str, Any]]


class TestStep(Model):
    """One step of a catalog test: ``ingest`` documents, or ``verify`` what a derivation made."""

    ingest: IngestStep | None = None
    verify: VerifyStep | None = None
    description: str | None = None


class Catalog(Model):
    """The whole catalog file, interpolated, validated and cross-checked."""

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    collections: dict[str, CollectionSpec]
    captures: dict[str, CaptureSpec] = Field(default_factory=dict)
    materializations: dict[str, MaterializationSpec] = Field(default_factory=dict)
    tests: dict[str, list[TestStep]] = Field(default_factory=dict)
    _path: Path | None = PrivateAttr(default=None)

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


def load_catalog(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Catalog:
    """Load, interpolate, validate and cross-check a catalog file.

    Raises ConfigError listing every problem with its place, e.g.
    ``captures.sophia/metrics.interval: '30x' is not a duration``.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read catalog: {e.strerror}", str(file)) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        raise ConfigError(f"not valid YAML: {getattr(e, 'problem', e)}", where) from e
    if not isinstance(raw, dict):
        raise ConfigError("a catalog is a mapping with `collections`, `captures`, `materializations`", str(file))

    problems: list[tuple[str, str]] = []
    raw = interpolate(raw, dict(os.environ if env is None else env), "", problems)
    _resolve_schema_files(raw, file.parent, problems)
    if problems:
        raise ConfigError(problems)
    try:
        catalog = Catalog.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(pydantic_problems(e, "")) from None
    catalog._path = file.resolve()
    check_catalog(catalog, problems)
    if problems:
        raise ConfigError(problems)
    return catalog


def _resolve_schema_files(raw: dict[str, Any], base: Path, problems: list[tuple[str, str]]) -> None:
    collections = raw.get("collections")
    if not isinstance(collections, dict):
        return
    for name, spec in collections.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), str):
            continue
        place = f"collections.{name}.schema"
        file = base / spec["schema"]
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except OSError as e:
            problems.append((place, f"cannot read schema file {file}: {e.strerror}"))
            continue
        except yaml.YAMLError as e:
            problems.append((place, f"schema file {file} is not valid JSON/YAML: {e}"))
            continue
        if not isinstance(loaded, dict):
            problems.append((place, f"schema file {file} does not hold a JSON Schema object"))
            continue
        spec["schema"] = loaded


def pydantic_problems(error: ValidationError, prefix: str) -> list[tuple[str, str]]:
    """Turn pydantic's errors into ``(place, message)`` pairs under ``prefix``."""
    out = []
    for err in error.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        place = prefix
        for part in loc:
            place = f"{place}[{part}]" if part.isdigit() else _join(place, part)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; see the connector's documented fields)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        out.append((place, msg))
    return out


def check_catalog(catalog: Catalog, problems: list[tuple[str, str]]) -> None:
    """Cross-checks that pydantic cannot express; appends to ``problems``."""
    from connectors import known_connectors, load_connector
    from transforms import check_derivation

    for name, coll in catalog.collections.items():
        place = f"collections.{name}"
        topic = topic_of(name)
        if not _NAME.match(name) or ".." in name or len(topic) > 240:
            problems.append((place, f"{name!r} is not a valid collection name (letters, digits, _ - . /)"))
        schema = coll.schema_
        assert isinstance(schema, dict)
        try:
            import fastjsonschema

            fastjsonschema.compile(schema)
        except Exception as e:  # noqa: BLE001 - any compile failure is a schema problem
            problems.append((f"{place}.schema", f"not a valid JSON Schema: {e}"))
            continue
        for i, pointer in enumerate(coll.key):
            why = key_problem(schema, pointer)
            if why:
                problems.append((f"{place}.key[{i}]", why))

    for kind, tasks in (("captures", catalog.captures), ("materializations", catalog.materializations)):
        for name, task in tasks.items():
            task._name = name
            place = f"{kind}.{name}"
            connector_name = task.connector
            try:
                connector = load_connector(connector_name)
            except KeyError:
                known = ", ".join(known_connectors(kind[:-1]))
                problems.append((f"{place}.endpoint", f"unknown connector {connector_name!r}; known {kind}: {known}"))
                continue
            if connector.kind != kind[:-1]:
                problems.append((f"{place}.endpoint", f"{connector_name!r} is a {connector.kind} connector, not a {kind[:-1]}"))
                continue
            try:
                task._config = connector.config.model_validate(task.endpoint[connector_name])
            except ValidationError as e:
                problems.extend(pydantic_problems(e, f"{place}.endpoint.{connector_name}"))
            for i, binding in enumerate(task.bindings):
                bplace = f"{place}.bindings[{i}]"
                coll_name = binding.target if kind == "captures" else binding.source
                field = "target" if kind == "captures" else "source"
                if coll_name not in catalog.collections:
                    problems.append((f"{bplace}.{field}", _unknown_collection(coll_name, catalog)))
                try:
                    binding._resource = connector.resource.model_validate(binding.resource)
                except ValidationError as e:
                    problems.extend(pydantic_problems(e, f"{bplace}.resource"))
                for j, pointer in enumerate(getattr(binding, "mask", [])):
                    if not pointer.startswith("/"):
                        problems.append((f"{bplace}.mask[{j}]", f"{pointer!r} is not a JSON pointer"))
            if connector.check is not None and task._config is not None:
                problems.extend(connector.check(catalog, task, place))

    for name, coll in catalog.derivations.items():
        assert coll.derive is not None
        place = f"collections.{name}.derive"
        for i, t in enumerate(coll.derive.transforms):
            if t.source not in catalog.collections:
                problems.append((f"{place}.transforms[{i}].source", _unknown_collection(t.source, catalog)))
        if not any(p.startswith(f"{place}.transforms") for p, _ in problems):
            problems.extend(check_derivation(catalog, name, place))

    for name, steps in catalog.tests.items():
        for i, step in enumerate(steps):
            if (step.ingest is None) == (step.verify is None):
                problems.append((f"tests.{name}[{i}]", "a step is exactly one of `ingest` or `verify`"))
                continue
            coll = (step.ingest or step.verify).collection  # type: ignore[union-attr]
            if coll not in catalog.collections:
                problems.append((f"tests.{name}[{i}].collection", _unknown_collection(coll, catalog)))


def _unknown_collection(name: str, catalog: Catalog) -> str:
    return f"{name!r} is not a declared collection; declared: {', '.join(sorted(catalog.collections))}"


def resolve_pointer(schema: dict[str, Any], pointer: str) -> tuple[dict[str, Any] | None, str]:
    """The sub-schema a JSON pointer names, or None and why not."""
    node = schema
    for token in pointer_tokens(pointer):
        props = node.get("properties", {})
        if token not in props:
            return None, f"{pointer!r}: {token!r} is not a property of the schema"
        if token not in node.get("required", []):
            return None, f"{pointer!r}: property {token!r} must be required to be part of the key"
        node = props[token]
    return node, ""


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


def pointer_tokens(pointer: str) -> list[str]:
    """RFC 6901 tokens of a JSON pointer (``/a~1b/c`` -> ``["a/b", "c"]``)."""
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""What ``resolve`` gives for a pointer naming nothing (distinct from a JSON null)."""


def resolve(doc: Any, tokens: Sequence[str]) -> Any:
    """The value at a JSON pointer's tokens in ``doc``, or MISSING: tokens name object members or,
    in arrays, indices written as RFC 6901 says (``0``, ``12``; not ``01`` nor ``-``)."""
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            node = node.get(token, MISSING)  # MISSING is neither dict nor list: the next token returns it
        elif (isinstance(node, list) and token.isascii() and token.isdigit() and (token[0] != "0" or token == "0")
              and int(token) < len(node)):
            node = node[int(token)]
        else:
            return MISSING
    return node
