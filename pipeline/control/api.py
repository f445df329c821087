"""The REST API of ``localflow run --api-port`` (aiohttp), for the platform's client and for curl.

Every route is under ``/v1`` and described by ``/v1/openapi.json``. A bearer token
(``LOCALFLOW_API_TOKEN``) is required on every route when set, compared in constant time; a
bind beyond loopback without one is refused at startup. Changes (create, pause, resume,
restart, delete) are written to the config topic, so they survive restarts and reach every
worker; a response is sent once this worker has applied the change.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import __version__
from pipeline.control.effective import capture_entries
from pipeline.control.runner import Conflict, Controller, NotFound, Unavailable, problem_lines
from pipeline.runtime.catalog import Catalog, topic_of
from pipeline.runtime.task import STATUS, kind_of
from pipeline.sdk.errors import ConfigError, EndpointError
from pipeline.sdk.problems import Problem, pydantic_problems
from pipeline.telemetry.logs import redact

log = logging.getLogger("localflow.api")

TOKEN_ENV = "LOCALFLOW_API_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------- bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskRequest(_Body):
    """A task to create: its name and its catalog entry, written as in flow.yaml."""

    name: str = Field(min_length=1, description="The task's name, e.g. sophia/sophia_ai_data.")
    config: dict[str, Any] = Field(description="The catalog entry, as under `captures:` / `materializations:` "
                                               "in flow.yaml (endpoint, bindings...).")


class CaptureRequest(TaskRequest):
    """A capture to create. ``config`` is a catalog entry, or the seed's short form
    ``{"endpoint": "https://..."}``: an http capture into a collection named after it."""

    collections: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="New collections the capture writes, as under `collections:`.")


class CollectionRequest(TaskRequest):
    """A collection (a derivation when ``config`` has ``derive``), as under `collections:` in flow.yaml."""


# ---------------------------------------------------------------------------- server


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json",
                        headers=headers)


def _error(status: int, error: str, **extra: Any) -> web.Response:
    return _json({"success": False, "error": error, **extra}, status)


class ApiServer:
    """The API of one worker; ``controller`` holds its tasks and the effective catalog."""

    def __init__(self, controller: Controller, token: str | None = None) -> None:
        self.controller = controller
        self._token = (os.environ.get(TOKEN_ENV, "") if token is None else token).encode()
        self._runner: web.AppRunner | None = None
        self.host, self.port = "", 0
        self.started_at = time.time()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth, self._errors], client_max_size=4 * 1024 * 1024)
        r = app.router
        r.add_get("/v1/health", self.health)
        r.add_get("/v1/openapi.json", self.openapi)
        r.add_get("/v1/collections", self.collections)
        r.add_post("/v1/collections", self.create_collection)
        r.add_get("/v1/tasks", self.tasks)
        r.add_post("/v1/captures", self.create_capture)
        r.add_post("/v1/materializations", self.create_materialization)
        r.add_put("/v1/tasks/{name:.+}/{action:pause|resume|restart}", self.action)
        r.add_get("/v1/tasks/{name:.+}", self.task)
        r.add_delete("/v1/tasks/{name:.+}", self.delete)
        return app

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0: any free port); refuses a non-loopback bind without a token."""
        if not self._token and not is_loopback(host):
            raise ConfigError(f"the API would listen on {host}, beyond loopback, without a token: set "
                              f"{TOKEN_ENV} (clients send it as `Authorization: Bearer ...`) or use "
                              "--api-host 127.0.0.1", "--api-host")
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001 - the bound port when 0 was asked
        self.host, self.port = host, sockets[0].getsockname()[1] if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ middlewares

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
                return _json({"success": False, "error": f"missing or wrong bearer token (see {TOKEN_ENV})"},
                             401, headers={"WWW-Authenticate": 'Bearer realm="localflow"'})
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConfigError as e:
            return _error(422, "the catalog would not be valid", messages=problem_lines(e),
                          problems=[p.as_json() if isinstance(p, Problem) else {"path": p[0], "message": p[1]}
                                    for p in e.problems])
        except NotFound as e:
            return _error(404, str(e))
        except Conflict as e:
            return _error(409, str(e))
        except (Unavailable, EndpointError) as e:
            return _error(503, redact(str(e)))

    # ------------------------------------------------------------------ reading

    async def health(self, request: web.Request) -> web.Response:
        c = self.controller
        names = c.catalog.task_names()
        states = [c.state(n)[0] for n in names]
        store = c.store
        problems = list(c.problems)
        if store is not None and not store.caught_up.is_set():
            problems.append(f"config topic {store.topic} not read yet")
        failed = states.count("FAILED")
        if failed:
            problems.append(f"{failed} task(s) failed")
        return _json({
            "status": "degraded" if problems else "healthy",
            "success": True,
            "version": __version__,
            "worker": {"pid": os.getpid(), "host": socket.gethostname(), "started_at": self.started_at},
            "catalog": str(c.path),
            "config_topic": store.topic if store is not None else None,
            "tasks": {"total": len(names), **{s.lower(): states.count(s) for s in
                                               ("RUNNING", "PAUSED", "FAILED", "UNASSIGNED")}},
            "problems": problems,
        })

    async def collections(self, request: web.Request) -> web.Response:
        catalog = self.controller.catalog
        problems: list[str] = []
        documents: dict[str, int | None] = {}
        lags: dict[str, dict[str, int]] = {}
        try:
            documents, reports = await asyncio.gather(_documents(catalog), _reports(catalog))
            for report in reports:
                for p in report.partitions:
                    by_task = lags.setdefault(p.collection, {})
                    by_task[report.name] = by_task.get(report.name, 0) + p.lag
        except EndpointError as e:
            problems.append(redact(str(e)))
        items = [{
            "name": name,
            "topic": topic_of(name),
            "schema": catalog.schema(name),
            "key": spec.key,
            "partitions": spec.partitions,
            "derived": spec.derive is not None,
            "origin": self.controller.origin("collections", name),
            "documents": documents.get(name),
            "lag": lags.get(name, {}),
        } for name, spec in catalog.collections.items()]
        return _json({"success": True, "count": len(items), "collections": items, "problems": problems})

    async def tasks(self, request: web.Request) -> web.Response:
        catalog = self.controller.catalog
        reports, problems = await self._reports_or_problem(catalog)
        items = [self._task_view(catalog, name, reports.get(name)) for name in catalog.task_names()]
        return _json({"success": True, "count": len(items), "tasks": items, "problems": problems})

    async def task(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        catalog = self.controller.catalog
        self.controller.task_kind(name)  # raises NotFound
        reports, problems = await self._reports_or_problem(_only(catalog, name))
        return _json({"success": True, **self._task_view(catalog, name, reports.get(name)), "problems": problems})

    async def _reports_or_problem(self, catalog: Catalog) -> tuple[dict[str, Any], list[str]]:
        try:
            return {r.name: r for r in await _reports(catalog)}, []
        except EndpointError as e:
            return {}, [redact(str(e))]

    def _task_view(self, catalog: Catalog, name: str, report: Any) -> dict[str, Any]:
        kind = kind_of(catalog, name)
        section = "collections" if kind == "derivation" else f"{kind}s"
        state, reason = self.controller.state(name)
        status = STATUS.get(name)
        partitions = [{"collection": p.collection, "partition": p.partition, "end": p.end,
                       "checkpoint": p.checkpoint, "lag": p.lag, "worker": p.worker}
                      for p in (report.partitions if report else [])]
        return {
            "name": name,
            "kind": kind,
            "origin": self.controller.origin(section, name),
            "state": state,
            "reason": redact(reason) if reason else None,
            "partitions": partitions,
            "leases": report.leases if report else [],
            "lag": sum(p["lag"] for p in partitions),
            "checkpoint_at": report.checkpoint_at if report else None,
            "restarts": status.restarts if status else 0,
            "documents": status.documents if status else 0,
            "last_error": redact(status.last_error) if status and status.last_error else None,
            "last_error_at": status.last_error_at if status else None,
        }

    # ------------------------------------------------------------------ changing

    async def create_capture(self, request: web.Request) -> web.Response:
        body = await _body(request, CaptureRequest)
        existing = set(self.controller.catalog.collections) | set(body.collections)
        entries = capture_entries(body.name, body.config, existing)
        if body.collections:
            entries["collections"] = {**entries.get("collections", {}), **body.collections}
        return await self._create(entries, body.name, "capture")

    async def create_materialization(self, request: web.Request) -> web.Response:
        body = await _body(request, TaskRequest)
        return await self._create({"materializations": {body.name: body.config}}, body.name, "materialization")

    async def create_collection(self, request: web.Request) -> web.Response:
        body = await _body(request, CollectionRequest)
        kind = "derivation" if "derive" in body.config else "collection"
        return await self._create({"collections": {body.name: body.config}}, body.name, kind)

    async def _create(self, entries: dict[str, dict[str, Any]], name: str, kind: str) -> web.Response:
        created = await self.controller.create(entries)
        log.info("created %s %s through the API", kind, name)
        state = self.controller.state(name)[0] if kind != "collection" else None
        return _json({"success": True, "name": name, "kind": kind, "created": created, "state": state}, 201)

    async def action(self, request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        await getattr(self.controller, action)(name)
        log.info("%s %s through the API", {"pause": "paused", "resume": "resumed", "restart": "restarted"}[action], name)
        state, reason = self.controller.state(name)
        return _json({"success": True, "name": name, "action": action, "state": state, "reason": reason})

    async def delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self.controller.delete(name)
        log.info("deleted %s through the API", name)
        return _json({"success": True, "name": name, "deleted": True})

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document())


async def _body(request: web.Request, model: type[BaseModel]) -> Any:
    try:
        data = await request.json(loads=orjson.loads)
    except ValueError:
        raise ConfigError("the request body is not JSON", "body") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(pydantic_problems(e, "body")) from None


async def _reports(catalog: Catalog) -> list[Any]:
    """Per task, lag per input partition and checkpoint time, from the broker (as `localflow status`),
    the tasks read concurrently (each read waits on the broker, not on this process)."""
    from pipeline.cli.status import gather, with_cluster

    reports = await asyncio.gather(*(gather(_only(catalog, name), []) for name in catalog.task_names()))
    problems = list(dict.fromkeys(p for r in reports for p in r.problems))
    if problems:
        raise EndpointError("; ".join(problems))
    tasks = [task for r in reports for task in r.tasks]
    await with_cluster(catalog, tasks)  # in a cluster: who holds each lease and partition, from every worker
    return tasks


def _only(catalog: Catalog, name: str) -> Catalog:
    """The catalog with one task (and every collection), so that its report reads only its own offsets."""
    kind = kind_of(catalog, name)
    return catalog.model_copy(update={
        "captures": {name: catalog.captures[name]} if kind == "capture" else {},
        "materializations": {name: catalog.materializations[name]} if kind == "materialization" else {},
        "collections": {n: c if c.derive is None or n == name else c.model_copy(update={"derive": None})
                        for n, c in catalog.collections.items()},  # other derivations: plain collections
    })


async def _documents(catalog: Catalog) -> dict[str, int | None]:
    """Documents per collection: the sum of its partitions' ends (None when the topic does not exist yet)."""
    from pipeline.runtime.offsets import high_watermarks, partitions_of, probe_consumer

    async with probe_consumer(catalog.kafka) as consumer:
        tps_of = {name: await partitions_of(consumer, topic_of(name)) for name in catalog.collections}
        ends = await high_watermarks(consumer, [tp for tps in tps_of.values() for tp in tps])
    return {name: (sum(ends[tp] for tp in tps) if tps else None) for name, tps in tps_of.items()}


# ---------------------------------------------------------------------------- OpenAPI


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route (bodies from the pydantic models)."""
    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}

    def answers(ok: str, *errors: int) -> dict[str, Any]:
        out: dict[str, Any] = {"200" if "created" not in ok else "201": {"description": ok}}
        notes = {401: "missing or wrong bearer token", 404: "no such task", 409: "conflicts with the catalog",
                 422: "the catalog would not be valid: `messages` are those of `localflow validate`",
                 503: "the config topic is not available"}
        out.update({str(code): {"description": notes[code]} for code in (401, *errors)})
        return out

    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "The task's name; `/` may be written as is."}]
    paths: dict[str, Any] = {
        "/v1/health": {"get": {"summary": "Health: status healthy or degraded, task counts, problems",
                               "responses": answers("the worker's health")}},
        "/v1/collections": {
            "get": {"summary": "Collections: name, schema, key, partitions, documents, lag per reading task",
                    "responses": answers("the collections of the effective catalog")},
            "post": {"summary": "Create a collection or a derivation", "requestBody": body(CollectionRequest),
                     "responses": answers("created", 409, 422, 503)}},
        "/v1/captures": {"post": {"summary": "Create a capture", "requestBody": body(CaptureRequest),
                                  "responses": answers("created", 409, 422, 503)}},
        "/v1/materializations": {"post": {"summary": "Create a materialization", "requestBody": body(TaskRequest),
                                          "responses": answers("created", 409, 422, 503)}},
        "/v1/tasks": {"get": {"summary": "Tasks: kind, state (RUNNING, PAUSED, FAILED, UNASSIGNED), lag, checkpoint; "
                              "in a cluster, which worker holds each capture lease and input partition",
                              "responses": answers("every task")}},
        "/v1/tasks/{name}": {
            "get": {"summary": "One task", "parameters": name, "responses": answers("the task", 404)},
            "delete": {"summary": "Delete a task created through the API (stops after a flush)",
                       "parameters": name, "responses": answers("deleted", 404, 409, 422, 503)}},
    }
    for action, what in (("pause", "Pause a task on every worker (it flushes, then stops)"),
                         ("resume", "Resume a paused task"), ("restart", "Restart a task on every worker")):
        paths[f"/v1/tasks/{{name}}/{action}"] = {"put": {"summary": what, "parameters": name,
                                                         "responses": answers("done", 404, 503)}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "localflow control plane", "version": __version__,
                 "description": "Tasks created here are stored in the config topic and run by every worker."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
