"""A private Docker engine for the compose test: its own dockerd, a Debian base image, compose runs.

Why its own engine: neither this machine nor CI runs one, and no registry is reachable, so the
test starts `dockerd` by hand (its own socket, exec root and pid file under a temp dir; stopped by
PID at the end) and builds every image from Debian packages. Its containers live in their own
network namespaces on the compose network: `--iptables=false --ip-masq=false` leaves the host's
firewall alone and gives them no route out, `--bridge=none` creates no docker0 (one that appears
anyway is deleted at the end, unless it was there before). Published ports are 127.0.0.1 only.

The cache (LOCALFLOW_CACHE_DIR, else /var/cache/localflow as root, else ~/.cache/localflow) holds
the debootstrap root file system as a tarball and the engine's data root, so a warm run rebuilds
nothing that did not change. One run at a time uses it (a lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"  # Debian 12: python3 is 3.11, as in the default BASE_IMAGE of the Dockerfile
MIRROR = os.environ.get("LOCALFLOW_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
HOST_CAS = Path("/usr/local/share/ca-certificates")  # the host's own CAs (a TLS proxy's, say)


def cache_dir() -> Path:
    if env := os.environ.get("LOCALFLOW_CACHE_DIR"):
        return Path(env)
    return Path("/var/cache/localflow") if os.geteuid() == 0 else Path.home() / ".cache" / "localflow"


def run(cmd: Sequence[str], *, timeout: float, env: dict[str, str] | None = None, check: bool = True,
        cwd: Path | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with the command and the tail of its output."""
    result = subprocess.run(list(cmd), capture_output=True, text=stdin is None, env=env, cwd=cwd,
                            timeout=timeout, input=stdin)
    if check and result.returncode != 0:
        out = result.stdout if isinstance(result.stdout, str) else result.stdout.decode(errors="replace")
        err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode(errors="replace")
        raise RuntimeError(f"`{' '.join(cmd)}` exited {result.returncode}:\n{out[-3000:]}\n{err[-3000:]}")
    return result


class Engine:
    """One running dockerd: `env` points docker and docker-compose at it."""

    def __init__(self, cache: Path, run_dir: Path, proc: subprocess.Popen[bytes]) -> None:
        self.cache, self.run_dir, self.proc = cache, run_dir, proc
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{run_dir}/docker.sock",
                    "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}

    def docker(self, *args: str, timeout: float = 60, check: bool = True,
               stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return run(["docker", *args], timeout=timeout, env=self.env, check=check, stdin=stdin)

    def base_image(self) -> str:
        """The Debian base every test image starts from: debootstrap once, then from the cache."""
        cas = sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []
        key = hashlib.sha256(repr((SUITE, MIRROR, BASE_PACKAGES)).encode()
                             + b"".join(p.read_bytes() for p in cas)).hexdigest()[:12]
        tag = f"localflow-base:{SUITE}-{key}"
        if self.docker("image", "inspect", tag, check=False).returncode == 0:
            return tag
        tarball = self.cache / f"debian-{SUITE}-{key}.tar"
        if not tarball.exists():
            _debootstrap(tarball, cas)
        with tarball.open("rb") as f:
            run(["docker", "import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", "-", tag],
                timeout=300, env=self.env, stdin=f.read())
        return tag


def _debootstrap(tarball: Path, cas: list[Path]) -> None:
    """A minimal Debian root file system with Python, trusting the host's own CAs, as a tarball."""
    with tempfile.TemporaryDirectory(dir=tarball.parent, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
             str(rootfs), MIRROR], timeout=1200)
        if cas:
            for ca in cas:
                shutil.copy2(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
            run(["chroot", str(rootfs), "update-ca-certificates"], timeout=120)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], timeout=600)
        partial.rename(tarball)


@contextmanager
def _exclusive(lock: Path, timeout: float) -> Iterator[None]:
    """One compose test at a time per cache (they share the engine's data root)."""
    with lock.open("w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{lock} is held by another compose test for {timeout:g}s") from None
                time.sleep(1)  # polling a lock another run holds; bounded by the deadline
        yield


@contextmanager
def docker_engine(start_timeout: float = 60) -> Iterator[Engine]:
    """Start a private dockerd on the cache's data root; stop it by PID and clean up afterwards."""
    for tool in ("dockerd", "docker", "docker-compose", "debootstrap"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: `make test-compose` installs docker.io, docker-compose "
                               "and debootstrap with apt-get")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    docker0 = Path("/sys/class/net/docker0")
    had_docker0 = docker0.exists()
    with _exclusive(cache / "engine.lock", timeout=1200):
        run_dir = Path(tempfile.mkdtemp(prefix="lf-dockerd-", dir="/tmp"))  # short: socket paths
        log = (run_dir / "dockerd.log").open("wb")
        proc = subprocess.Popen(
            ["dockerd", "--host", f"unix://{run_dir}/docker.sock", "--data-root", str(cache / "docker"),
             "--exec-root", str(run_dir / "exec"), "--pidfile", str(run_dir / "docker.pid"),
             "--bridge", "none", "--iptables=false", "--ip-masq=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        engine = Engine(cache, run_dir, proc)
        try:
            deadline = time.monotonic() + start_timeout
            while engine.docker("info", "--format", "{{.ServerVersion}}", check=False).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not start: {(run_dir / 'dockerd.log').read_text()[-3000:]}")
                time.sleep(0.2)  # polling the socket until dockerd answers; bounded by the deadline
            yield engine
        finally:
            if proc.poll() is None:  # no bridge (br-...) outlives the engine, even after a failed `down`
                with contextlib.suppress(subprocess.TimeoutExpired):
                    engine.docker("network", "prune", "--force", check=False)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            log.close()
            if docker0.exists() and not had_docker0:
                run(["ip", "link", "delete", "docker0"], timeout=30, check=False)
            _unmount_under(run_dir)  # dockerd leaves exec/netns/default mounted
            shutil.rmtree(run_dir)


def _unmount_under(directory: Path) -> None:
    """Unmount what is still mounted below `directory`, deepest first."""
    prefix = f"{directory}/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        run(["umount", mount], timeout=30)


class Compose:
    """docker-compose 1.29 on docker-compose.yml plus the test override, as one project."""

    def __init__(self, engine: Engine, project: str, env: dict[str, str]) -> None:
        self.engine, self.project = engine, project
        self.env = {**engine.env, **env}
        self.files = [ROOT / "docker-compose.yml", ROOT / "tests" / "compose" / "override.yml"]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "-p", self.project]
        for f in self.files:
            cmd += ["-f", str(f)]
        return run([*cmd, *args], timeout=timeout, env=self.env, check=check, cwd=ROOT)

    def containers(self, service: str) -> list[str]:
        """IDs of the service's containers (docker, not docker-compose: one quick call)."""
        return self.engine.docker("ps", "--all", "--quiet", "--filter", f"label=com.docker.compose.project={self.project}",
                                  "--filter", f"label=com.docker.compose.service={service}").stdout.split()

    def states(self) -> dict[str, list[tuple[str, str, int]]]:
        """{service: [(status, health or "", exit code) per container]} of the whole project, in two calls."""
        ids = self.engine.docker("ps", "--all", "--quiet", "--filter",
                                 f"label=com.docker.compose.project={self.project}").stdout.split()
        if not ids:
            return {}
        out: dict[str, list[tuple[str, str, int]]] = {}
        lines = self.engine.docker("inspect", "--format",
                                   '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} '
                                   "{{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.State.ExitCode}}",
                                   *ids).stdout.splitlines()
        for line in lines:
            service, status, health, code = line.split()
            out.setdefault(service, []).append((status, "" if health == "-" else health, int(code)))
        return out
