"""What the captures that poll over HTTP (``http``, ``prometheus``) share: the client, and reading a
body without letting a source fill the memory (a connector never imports another connector)."""

from __future__ import annotations

import httpx

from pipeline.runtime.capture import Capture
from pipeline.sdk.errors import SourceError


class PollingCapture(Capture):
    """A capture that polls over HTTP: one client from ``open`` to ``close``."""

    client: httpx.AsyncClient

    def new_client(self) -> httpx.AsyncClient:
        """The connector's client (headers, token, timeout from its config)."""
        raise NotImplementedError

    async def open(self) -> None:
        self.client = self.new_client()

    async def close(self) -> None:
        if hasattr(self, "client"):
            await self.client.aclose()


class BodyTooLarge(SourceError):
    """A response body is larger than the configured limit."""


def client(headers: dict[str, str], token: str, timeout: float, verify_tls: bool) -> httpx.AsyncClient:
    """A client that follows redirects and sends ``token``, when set, as ``Authorization: Bearer``."""
    headers = {"User-Agent": "localflow", **headers}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(headers=headers, timeout=timeout, verify=verify_tls, follow_redirects=True)


async def read_limited(response: httpx.Response, limit: int, setting: str) -> bytes:
    """The body of a streamed response, refused (BodyTooLarge) once it passes ``limit`` bytes: up
    front when its Content-Length says so, else as it arrives. ``setting`` names where the limit is
    configured, so the message says what to raise."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(response, limit, setting)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise _too_large(response, limit, setting)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(response: httpx.Response, limit: int, setting: str) -> BodyTooLarge:
    return BodyTooLarge(f"{response.request.method} {response.url}: the response body is larger than "
                        f"{setting}={limit}")
