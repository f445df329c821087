"""The real docker-compose.yml, started for real: `make test-compose` (marker `compose`).

The compose file is what a platform runs first, and it had only ever been checked statically
(tests/test_deploy.py) until its S3 images vanished from Docker Hub. This test runs it on a
private dockerd (tests/compose/engine.py) with tests/compose/override.yml, which swaps only the
images that cannot be built here (Kafka -> Tansu, SeaweedFS -> moto) and builds Postgres, Redis
and Prometheus from Debian packages; the workers are the project's own Dockerfile on a Debian
base. It checks what a user of the stack sees: every service healthy, rows in Postgres, keys in
Redis, the archive's objects in S3 (all through the ports published on 127.0.0.1), then two
cluster workers (`--scale worker=2`) sharing the Postgres materialization's partitions and both
scraped by Prometheus. The per-task profile's services are left out (one layout at a time).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import boto3
import pytest
import redis
import yaml

from tests.compose.engine import ROOT, Compose, docker_engine
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(2400)]  # a cold cache builds every image

PROJECT = "lftest"
ENV = {"POSTGRES_USER": "sophia", "POSTGRES_PASSWORD": "compose-test", "POSTGRES_DB": "sophia",
       "REDIS_PASSWORD": "compose-test", "AWS_ACCESS_KEY_ID": "localflow", "AWS_SECRET_ACCESS_KEY": "compose-secret"}
BUCKET = "sophia-intel-data"
TABLES = ("sophia_processed_data", "sophia_agent_logs", "sophia_metrics")
KEY_PREFIXES = ("sophia:processed:", "sophia:raw:", "sophia:agent_logs:", "sophia:metrics:")
PARTITIONS = 3 * len(TABLES)  # sophia/postgres reads three collections of 3 partitions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    compose: Compose
    ports: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, started: float) -> None:
        self.timings[phase] = round(time.monotonic() - started, 1)
        print(f"compose test: {phase} took {self.timings[phase]} s", flush=True)

    def query(self, sql: str) -> Any:
        async def go() -> Any:
            conn = await asyncpg.connect(host="127.0.0.1", port=self.ports["POSTGRES_PUBLISHED_PORT"],
                                         user=ENV["POSTGRES_USER"], password=ENV["POSTGRES_PASSWORD"],
                                         database=ENV["POSTGRES_DB"], timeout=5)
            try:
                return await conn.fetchval(sql)
            finally:
                await conn.close()
        return asyncio.run(go())

    def redis(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports["REDIS_PUBLISHED_PORT"], password=ENV["REDIS_PASSWORD"],
                           socket_timeout=5)

    def s3(self) -> Any:
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.ports['S3_PUBLISHED_PORT']}",
                            aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"], region_name="us-east-1",
                            aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"])

    def prometheus(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.ports['PROMETHEUS_PUBLISHED_PORT']}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)


def _services() -> list[str]:
    """Every service of docker-compose.yml but Grafana (not packaged by Debian; not built here) and
    the per-task layout's (the cluster `worker` runs those tasks)."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return [name for name, svc in services.items() if name != "grafana" and "per-task" not in svc.get("profiles", ())]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    started = time.monotonic()
    with docker_engine() as engine:
        ports = {name: _free_port() for name in ("POSTGRES_PUBLISHED_PORT", "REDIS_PUBLISHED_PORT",
                                                 "S3_PUBLISHED_PORT", "PROMETHEUS_PUBLISHED_PORT")}
        s = Stack(Compose(engine, PROJECT, {}), ports)
        s.timed("engine start", started)
        t = time.monotonic()
        base = engine.base_image()
        s.timed("base image", t)
        s.compose = Compose(engine, PROJECT, {**ENV, **{k: str(v) for k, v in ports.items()},
                                              "LOCALFLOW_BASE_IMAGE": base})
        s.compose("down", "--volumes", "--remove-orphans", "--timeout", "5")  # what an interrupted run left
        t = time.monotonic()
        built = s.compose("build", "--parallel", "kafka", "s3", "postgres", "redis", "prometheus", "demo-sources",
                          timeout=1800)
        print(f"compose test: {built.stdout.count('Running in')} build steps ran, "
              f"{built.stdout.count('Using cache')} came from the cache", flush=True)
        # Old worker images pile up as the code changes; a week keeps the build cache of the worker's
        # build stage (untagged too, so a plain prune would throw it away and rebuild it every time).
        engine.docker("image", "prune", "--force", "--filter", "until=168h")
        s.timed("images", t)
        try:
            t = time.monotonic()
            s.compose("--profile", "monitoring", "up", "--detach", "--no-build", *_services(), timeout=600)
            s.timed("up", t)
            yield s
        except BaseException:
            print(s.compose("ps", check=False).stdout)
            print(s.compose("logs", "--no-color", "--tail", "40", check=False).stdout[-20000:])
            raise
        finally:
            t = time.monotonic()
            s.compose("--profile", "monitoring", "down", "--volumes", "--remove-orphans", "--timeout", "20",
                      timeout=300, check=False)
            s.timed("down", t)
            print(f"compose test timings (s): {json.dumps(s.timings)}", flush=True)


def _healthy(stack: Stack, services: list[str]) -> dict[str, list[tuple[str, str, int]]]:
    """{service: [(status, health, exit code) per container]} when all are healthy, else {}."""
    states = {svc: containers for svc, containers in stack.compose.states().items() if svc in services}
    if set(states) != set(services):
        return {}
    for svc, containers in states.items():
        for status, health, code in containers:
            done = svc == "s3-init" and status == "exited" and code == 0  # a one-shot: exited 0
            if not done and (status != "running" or health not in ("healthy", "")):
                return {}
    return states


def _assigned(stack: Stack, container: str, task: str = "sophia/postgres") -> set[str]:
    """The partitions of ``task`` a worker logged as its latest assignment."""
    out = stack.compose.engine.docker("logs", container)
    logs = out.stdout + out.stderr
    latest: set[str] = set()
    for line in logs.splitlines():
        try:
            entry = json.loads(line)
            msg = entry.get("message", "") if entry.get("task") == task else ""
        except (json.JSONDecodeError, AttributeError):
            continue
        if msg.startswith("assigned "):
            latest = {tp.split("@")[0] for tp in msg.removeprefix("assigned ").split(", ")}
    return latest


def test_the_compose_stack_runs_and_the_cluster_scales_to_two_workers(stack: Stack) -> None:
    t = time.monotonic()
    states = wait_for(lambda: _healthy(stack, _services()), timeout=300, interval=1,
                      message="every service healthy (s3-init exited 0)")
    assert set(states) == set(_services())
    stack.timed("healthy", t)

    t = time.monotonic()
    counts = wait_for(lambda: (c := {tbl: stack.query(f"SELECT count(*) FROM estuary.{tbl}") for tbl in TABLES})
                      and all(c.values()) and c, timeout=240, interval=1,
                      ignore=(OSError, asyncpg.PostgresError), message=f"rows in every table of {TABLES}")
    client = stack.redis()
    keys = wait_for(lambda: (k := {p: sum(1 for _ in client.scan_iter(f"{p}*", count=1000)) for p in KEY_PREFIXES})
                    and all(k.values()) and k, timeout=120, interval=1, ignore=(redis.RedisError,),
                    message=f"keys under every prefix of {KEY_PREFIXES}")
    stack.timed("rows and keys", t)
    print(f"compose test: rows {counts}; keys {keys}", flush=True)

    t = time.monotonic()
    stack.compose("--profile", "monitoring", "up", "--detach", "--no-build", "--no-recreate",
                  "--scale", "worker=2", "worker", timeout=300)
    workers = wait_for(lambda: len(c := stack.compose.containers("worker")) == 2 and c,
                       timeout=60, interval=1, message="two worker containers")
    wait_for(lambda: _healthy(stack, ["worker"]), timeout=120, interval=1,
             message="both cluster workers healthy")
    shares = wait_for(lambda: (a := [_assigned(stack, w) for w in workers]) and all(a)
                      and not (a[0] & a[1]) and len(a[0] | a[1]) == PARTITIONS and a,
                      timeout=120, interval=1, message=f"the two workers share the {PARTITIONS} partitions")
    # Agent log lines arrive all the time (the API is polled every 5 minutes, metrics every 30 s).
    before = stack.query("SELECT count(*) FROM estuary.sophia_agent_logs")
    wait_for(lambda: stack.query("SELECT count(*) FROM estuary.sophia_agent_logs") > before, timeout=120,
             interval=1, message="rows still arriving after the rebalance")
    stack.timed("scale to 2", t)
    print(f"compose test: partitions per worker {[sorted(a) for a in shares]}", flush=True)

    t = time.monotonic()
    def scraped() -> list[str]:
        targets = stack.prometheus("/api/v1/targets")["data"]["activeTargets"]
        return sorted(x["labels"]["instance"] for x in targets
                      if x["labels"].get("service") == "worker" and x["health"] == "up")
    instances = wait_for(lambda: len(s := scraped()) == 2 and s, timeout=120, interval=1,
                         ignore=(OSError, KeyError), message="Prometheus scrapes both cluster workers")
    stack.timed("prometheus scrapes both", t)

    # The archive writes an object per partition every 5 minutes at most, and on a clean stop.
    t = time.monotonic()
    stack.compose("stop", "--timeout", "40", "worker", timeout=120)  # the archive flushes on a clean stop
    s3 = stack.s3()
    objects = wait_for(lambda: s3.list_objects_v2(Bucket=BUCKET, Prefix="estuary/").get("Contents"),
                       timeout=60, interval=1, message=f"objects under s3://{BUCKET}/estuary/")
    stack.timed("archive objects", t)
    data = [o["Key"] for o in objects if not o["Key"].startswith("estuary/_localflow/")]  # not checkpoints
    print(f"compose test: {len(data)} archive objects (+{len(objects) - len(data)} checkpoints), e.g. {data[:1]}; "
          f"Prometheus targets of the cluster workers {instances}", flush=True)
    assert all(key.endswith(".jsonl.gz") for key in data), data
    archived = {key.split("/")[2] for key in data}
    assert archived == {"sophia_raw_data", "sophia_processed_data", "sophia_agent_logs", "sophia_metrics"}, data


def test_task_down_fires_for_a_failed_task_a_failed_scrape_and_a_vanished_worker(stack: Stack) -> None:
    """The rule unit test of tests/compose/alerts_test.yml, by promtool from the Prometheus image."""
    image = yaml.safe_load((ROOT / "tests/compose/override.yml").read_text())["services"]["prometheus"]["image"]
    result = stack.compose.engine.docker("run", "--rm", "--network", "none", "--entrypoint", "promtool",
                                         "--volume", f"{ROOT}:/src:ro", image,
                                         "test", "rules", "/src/tests/compose/alerts_test.yml", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
