"""The session's servers as fixtures: real Kafka/Postgres/Redis/S3, started lazily, once per session;
private servers a test may kill; names no other test uses. tests/conftest.py imports them all.

Why lazy: a module that only needs Kafka should not pay for initdb or moto. Every fixture below
draws on one `Services` object (`lazy_services`), so `services`, `kafka_bootstrap`,
`postgres_url`, `redis_url` and `s3_endpoint_url` always point at the same servers.
Setting KAFKA_BOOTSTRAP_SERVERS, POSTGRES_URL, REDIS_URL or S3_ENDPOINT_URL runs the suite
against existing servers instead.

The session servers are shared: never `kill()`/`restart()` them. Fault-injection tests take
their own servers from `fresh_services(...)`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from pipeline.embedded.services import Services

__all__ = ["fresh_services", "kafka_bootstrap", "lazy_services", "postgres_url", "redis_url", "s3_endpoint_url",
           "services", "services_env", "unique_name"]


@pytest.fixture(scope="session")
def lazy_services() -> Iterator[Services]:
    """All four services, constructed (ports and URLs known) but not started; stopped at the end."""
    services = Services.from_env()
    try:
        yield services
    finally:
        services.stop()


@pytest.fixture(scope="session")
def services(lazy_services: Services) -> Services:
    """All four services, started."""
    lazy_services.start()
    return lazy_services


@pytest.fixture(scope="session")
def kafka_bootstrap(lazy_services: Services) -> str:
    """`host:port` of the session Kafka broker (starts only Kafka)."""
    lazy_services.kafka.start()
    return lazy_services.kafka.bootstrap_servers


@pytest.fixture(scope="session")
def postgres_url(lazy_services: Services) -> str:
    """URL of the session Postgres (starts only Postgres)."""
    lazy_services.postgres.start()
    return lazy_services.postgres.url


@pytest.fixture(scope="session")
def redis_url(lazy_services: Services) -> str:
    """URL of the session Redis (starts only Redis)."""
    lazy_services.redis.start()
    return lazy_services.redis.url


@pytest.fixture(scope="session")
def s3_endpoint_url(lazy_services: Services) -> str:
    """Endpoint URL of the session S3 (starts only S3)."""
    lazy_services.s3.start()
    return lazy_services.s3.endpoint_url


@pytest.fixture
def services_env(services: Services, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point code under test that reads the environment at the session services; returns the vars."""
    env = services.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def fresh_services() -> Iterator[Callable[..., Services]]:
    """Factory of private, started services that the test may kill and restart; stopped after it.

    Nothing is selected by default: `fresh_services(postgres=True)` starts Postgres only. The
    environment is ignored on purpose: fault injection needs servers this process owns.
    """
    made: list[Services] = []

    def make(
        *,
        kafka: bool = False,
        postgres: bool = False,
        redis: bool = False,
        s3: bool = False,
        durable_kafka: bool = False,
    ) -> Services:
        services = Services(kafka=kafka, postgres=postgres, redis=redis, s3=s3, durable_kafka=durable_kafka)
        made.append(services)
        services.start()
        return services

    try:
        yield make
    finally:
        for services in made:
            services.stop()


@pytest.fixture
def unique_name() -> Callable[..., str]:
    """Factory of names no other test (or earlier run against the same servers) uses.

    `unique_name()` -> `t_3f9c...` (topics, collections, Postgres schemas, Redis prefixes);
    `unique_name("b", sep="-")` for S3 buckets, whose names may not contain `_`.
    """

    def make(prefix: str = "t", *, sep: str = "_") -> str:
        return f"{prefix}{sep}{uuid.uuid4().hex[:16]}"

    return make
