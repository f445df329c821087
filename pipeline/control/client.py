"""The platform's client for localflow's REST API (``localflow run --api-port``).

A drop-in for the Estuary client the platform was written against (seed, "API Usage")::

    from pipeline.control.client import EstuaryClient

    async with EstuaryClient() as client:           # LOCALFLOW_API_URL, LOCALFLOW_API_TOKEN
        health = await client.health_check()        # health["status"] == "healthy"
        collections = await client.list_collections()   # collections["count"]
        result = await client.create_capture("my_capture", {"endpoint": "https://api.example.com/data"})
        result["success"]

Calls return the API's JSON as dicts. A refused request (404, 409, 422, 503) comes back with
``success`` false, the ``error`` and, for 422, the ``messages`` of `localflow validate`; an
unreachable API or a refused token raises ``LocalflowAPIError``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8730"
URL_ENV, TOKEN_ENV = "LOCALFLOW_API_URL", "LOCALFLOW_API_TOKEN"
_ANSWERED = {404, 409, 422, 503}
"""Statuses returned as ``{"success": False, ...}`` rather than raised."""


class LocalflowAPIError(Exception):
    """The API could not be reached, refused the token, or failed; ``status_code`` is None when unreachable."""

    def __init__(self, message: str, status_code: int | None = None, payload: Any = None) -> None:
        super().__init__(message)
        self.status_code, self.payload = status_code, payload


class LocalflowClient:
    """Async client of one localflow worker's API; use it as ``async with LocalflowClient() as c``."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0) -> None:
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        token = os.environ.get(TOKEN_ENV, "") if token is None else token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never the token
        return f"{type(self).__name__}({self.url!r})"

    async def __aenter__(self) -> LocalflowClient:
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        if self._http is None:
            await self.__aenter__()
        assert self._http is not None
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise LocalflowAPIError(f"cannot reach the localflow API at {self.url}: {type(e).__name__}: {e} "
                                    f"(is `localflow run --api-port` running? set {URL_ENV})") from e
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": response.text}
        if response.status_code == 401:
            raise LocalflowAPIError(f"the localflow API at {self.url} refused the token: "
                                    f"{'wrong token' if self._headers else f'{TOKEN_ENV} is not set'}", 401, payload)
        if response.is_success or response.status_code in _ANSWERED:
            if isinstance(payload, dict):
                payload.setdefault("success", response.is_success)
                if not response.is_success:
                    payload["status_code"] = response.status_code
            return payload
        raise LocalflowAPIError(f"{method} {path} failed: HTTP {response.status_code}: {payload.get('error', payload)}",
                                response.status_code, payload)

    # ---------------------------------------------------------------- reading

    async def health_check(self) -> dict[str, Any]:
        """``status`` is ``healthy`` or ``degraded`` (then ``problems`` says why)."""
        return await self._call("GET", "/v1/health")

    async def list_collections(self) -> dict[str, Any]:
        """``count`` and ``collections`` (name, schema, key, partitions, documents, lag)."""
        return await self._call("GET", "/v1/collections")

    async def list_tasks(self) -> dict[str, Any]:
        return await self._call("GET", "/v1/tasks")

    async def task_status(self, name: str) -> dict[str, Any]:
        """``state`` RUNNING, PAUSED, FAILED (``reason``) or UNASSIGNED, lag per partition, checkpoint time."""
        return await self._call("GET", f"/v1/tasks/{_path(name)}")

    get_capture_status = task_status  # the seed's name (its troubleshooting section)

    # ---------------------------------------------------------------- changing

    async def create_capture(self, name: str, config: dict[str, Any],
                             collections: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create a capture: ``config`` as under ``captures:`` in flow.yaml, or ``{"endpoint": url}``."""
        return await self._call("POST", "/v1/captures",
                                {"name": name, "config": config, "collections": collections or {}})

    async def create_materialization(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", "/v1/materializations", {"name": name, "config": config})

    async def create_collection(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """A collection, or a derivation when ``config`` has ``derive``."""
        return await self._call("POST", "/v1/collections", {"name": name, "config": config})

    async def pause(self, name: str) -> dict[str, Any]:
        return await self._call("PUT", f"/v1/tasks/{_path(name)}/pause")

    async def resume(self, name: str) -> dict[str, Any]:
        return await self._call("PUT", f"/v1/tasks/{_path(name)}/resume")

    async def restart(self, name: str) -> dict[str, Any]:
        return await self._call("PUT", f"/v1/tasks/{_path(name)}/restart")

    async def delete(self, name: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/v1/tasks/{_path(name)}")


EstuaryClient = LocalflowClient
"""The name the platform's code imports (``from ... import EstuaryClient``)."""


def _path(name: str) -> str:
    return quote(name, safe="/")


SOPHIA_CATALOGS = (Path(__file__).resolve().parent.parent / "examples/sophia/flow.yaml",  # a checkout
                   Path("examples/sophia/flow.yaml"))  # the working directory (/app in the image)


def _catalog_entries(catalog: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The catalog's data as the worker reads a file (YAML 1.2), its schema files inlined."""
    from pipeline.runtime.catalog import read_yaml

    if catalog is None:
        found = [p for p in SOPHIA_CATALOGS if p.is_file()]
        if not found:
            raise FileNotFoundError(f"no Sophia catalog at {' or '.join(map(str, SOPHIA_CATALOGS))}: "
                                    "pass its path, setup_sophia('path/to/flow.yaml')")
        catalog = found[0]
    path = Path(catalog)
    raw = read_yaml(path.read_text(encoding="utf-8"), str(path))
    for spec in (raw.get("collections") or {}).values():
        if isinstance(spec.get("schema"), str):
            file = path.parent / spec["schema"]
            spec["schema"] = read_yaml(file.read_text(encoding="utf-8"), str(file))
    return raw


async def setup_sophia(catalog: str | os.PathLike[str] | None = None,
                       client: LocalflowClient | None = None) -> dict[str, Any]:
    """What the seed's ``setup_sophia_estuary_flow()`` promised: create the Sophia catalog's
    collections, captures and materializations through the API (those that exist are left alone).

    Schema files are read here and sent inline; ``${VAR}`` references are sent as written and
    resolved by the worker from its environment. Returns ``success``, ``created``, ``existing``
    and ``failed`` (name -> the API's answer).
    """
    raw = _catalog_entries(catalog)
    collections = raw.get("collections") or {}
    own = client is None
    client = client or LocalflowClient()
    result: dict[str, Any] = {"created": [], "existing": [], "failed": {}}
    try:
        known = {c["name"] for c in (await client.list_collections())["collections"]}
        known |= {t["name"] for t in (await client.list_tasks())["tasks"]}
        plain = {n: s for n, s in collections.items() if "derive" not in s}
        steps = [*((n, client.create_collection, s) for n, s in plain.items()),
                 *((n, client.create_collection, s) for n, s in collections.items() if n not in plain),
                 *((n, client.create_capture, s) for n, s in (raw.get("captures") or {}).items()),
                 *((n, client.create_materialization, s) for n, s in (raw.get("materializations") or {}).items())]
        for name, create, spec in steps:
            if name in known:
                result["existing"].append(name)
                continue
            answer = await create(name, spec)
            if answer.get("success"):
                result["created"].append(name)
            else:
                result["failed"][name] = answer
    finally:
        if own:
            await client.aclose()
    result["success"] = not result["failed"]
    return result


setup_sophia_estuary_flow = setup_sophia
"""The seed's name for ``setup_sophia``."""
