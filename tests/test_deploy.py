"""The container deployment: compose file, worker commands, environment, alerts, dashboard.

Fast checks, without a Docker engine (tests/test_compose.py starts the stack for real, with
`make test-compose`): the compose file against the Compose Specification's JSON schema (the copy
shipped by PyPI's docker-compose 1.29 as compose/config/compose_spec.json, in tests/data/), every
image pinned, every worker command against the real CLI and catalog, every variable against the
code that reads it, the bucket step against a real S3 server, the alert rules with promql-parser
(and promtool where installed), and every dashboard metric against what the code exports.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.runtime.catalog import load_catalog

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
CATALOG = ROOT / "examples" / "sophia" / "flow.yaml"
OVERRIDE = ROOT / "tests" / "compose" / "override.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    for document in (compose, yaml.safe_load(OVERRIDE.read_text())):
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]
        assert errors == []
    broken = {**compose, "services": {**compose["services"], "kafka": {**compose["services"]["kafka"], "imag": "x"}}}
    assert list(validator.iter_errors(broken)), "the schema must reject an unknown service field"


def test_every_image_is_pinned_to_a_version_and_none_is_minio(compose: dict[str, Any]) -> None:
    """`docker compose up` pulls what it names: a moving tag changes under users, MinIO's are gone."""
    assert "minio" not in COMPOSE.read_text().lower()
    images = {name: svc["image"] for name, svc in compose["services"].items()}
    assert set(images) == set(compose["services"]), "every service names its image"
    for name, image in images.items():
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned to a version"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert {i for n, i in images.items() if "build" in compose["services"][n]} == {f"localflow:{version}"}
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert base and re.search(r":\d+\.\d+\.\d+-", base.group(1)), "the Dockerfile's base is pinned"
    assert compose["x-worker"]["build"]["args"]["BASE_IMAGE"] == f"${{LOCALFLOW_BASE_IMAGE:-{base.group(1)}}}"


def test_the_bucket_step_creates_the_archive_bucket_once(compose: dict[str, Any], s3_endpoint_url: str,
                                                          unique_name: Any) -> None:
    """s3-init runs its command against a real S3 server: the bucket exists after; a rerun is fine."""
    import boto3

    init = compose["services"]["s3-init"]
    assert init["entrypoint"] == ["python", "-c"] and init["restart"] == "no"
    script, bucket = init["command"]
    assert bucket == yaml.safe_load(CATALOG.read_text())["materializations"]["sophia/s3-archive"][
        "endpoint"]["s3"]["bucket"]
    assert compose["services"]["materialize-s3-archive"]["depends_on"]["s3-init"] == {
        "condition": "service_completed_successfully"}
    mine = unique_name("bucket", sep="-").lower()
    env = {"PATH": "/usr/bin:/bin", "S3_ENDPOINT_URL": s3_endpoint_url, "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    # The same bucket twice in one run (one Python start): created, then found.
    run = subprocess.run([sys.executable, "-c", script, mine, mine], capture_output=True, text=True, env=env)
    assert (run.returncode, run.stdout) == (0, f"created bucket {mine}\nbucket {mine} exists\n"), run.stderr
    s3 = boto3.client("s3", endpoint_url=s3_endpoint_url, aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    assert mine in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def _localflow_services(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Services that run a localflow command (s3-init runs Python from the same image)."""
    out = {}
    for name, svc in compose["services"].items():
        if (svc.get("image", "").startswith("localflow") or "build" in svc) and "entrypoint" not in svc:
            cmd = svc["command"]
            out[name] = cmd if isinstance(cmd, list) else shlex.split(cmd)
    return out


def test_every_task_of_the_catalog_has_one_worker_service(compose: dict[str, Any]) -> None:
    """Two layouts: the cluster `worker` (default) runs the whole catalog; the per-task profile one
    service per task. Both in one `up` would not double a capture (presence refuses the second)."""
    catalog = load_catalog(CATALOG, env={})
    run_tasks, clustered = [], []
    for name, cmd in _localflow_services(compose).items():
        if cmd[0] == "run":
            assert cmd[1] == "examples/sophia/flow.yaml", name
            if "--cluster" in cmd:
                assert "--task" not in cmd and "profiles" not in compose["services"][name], name
                clustered.append(name)
            else:
                assert compose["services"][name].get("profiles") == ["per-task"], name
                run_tasks.append(cmd[cmd.index("--task") + 1])
    assert sorted(run_tasks) == sorted(catalog.task_names())
    assert clustered == ["worker"]


def test_every_worker_command_is_a_valid_localflow_invocation(compose: dict[str, Any]) -> None:
    """Each command's options exist: `--help` after the same arguments parses and exits 0."""
    for name, cmd in _localflow_services(compose).items():
        result = subprocess.run([sys.executable, "-m", "pipeline", cmd[0], "--help"], capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == 0, f"{name}: `localflow {cmd[0]}` is not a command: {result.stderr}"
        for option in (a for a in cmd[1:] if a.startswith("--")):
            assert option in result.stdout, f"{name}: `localflow {cmd[0]}` has no option {option}"


_READS = [
    re.compile(r"environ(?:\.get)?[\[(]\s*[\"']([A-Z][A-Z0-9_]+)"),  # os.environ["X"], os.environ.get("X")
    re.compile(r"getenv\(\s*[\"']([A-Z][A-Z0-9_]+)"),  # os.getenv("X")
    re.compile(r"envvar=[\"']([A-Z][A-Z0-9_]+)"),  # typer options
    re.compile(r"^[A-Z_]*ENV\w*\s*=\s*[\"']([A-Z][A-Z0-9_]+)[\"']", re.M),  # MASK_KEY_ENV = "X"
]


def _variables_the_code_reads() -> set[str]:
    names: set[str] = set()
    for path in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("connectors/**/*.py"), *ROOT.glob("transforms/**/*.py")]:
        text = path.read_text()
        for pattern in _READS:
            names.update(pattern.findall(text))
    names.update(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", CATALOG.read_text()))
    return names


def test_every_variable_a_worker_sets_is_read_by_the_code(compose: dict[str, Any]) -> None:
    read = _variables_the_code_reads()
    worker_env = compose["x-localflow-env"]
    unread = sorted(set(worker_env) - read)
    assert unread == [], f"compose sets variables nothing reads: {unread}"
    example = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    missing = sorted(set(worker_env) - example - {"SOPHIA_AGENT_LOG_DIR", "LOCALFLOW_METRICS_PORT"})
    assert missing == [], f".env.example does not document: {missing}"


def _alert_rules() -> list[dict[str, Any]]:
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    return [rule for group in alerts["groups"] for rule in group["rules"]]


def test_every_alert_rule_parses_as_promql() -> None:
    """promql-parser (Prometheus' own grammar, from pip) checks what promtool would, with no promtool."""
    import promql_parser

    rules = _alert_rules()
    problems = []
    for rule in rules:
        name = rule.get("alert", "?")
        try:
            promql_parser.parse(rule["expr"])
        except ValueError as exc:
            problems.append(f"{name}: expr does not parse: {exc}")
        if "for" in rule:
            try:
                promql_parser.parse_duration(rule["for"])
            except ValueError as exc:
                problems.append(f"{name}: for {rule['for']!r}: {exc}")
        if not all(isinstance(v, str) for v in {**rule.get("labels", {}), **rule.get("annotations", {})}.values()):
            problems.append(f"{name}: labels and annotations must be strings")
    assert problems == []
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    for wanted in ("LocalflowAuthenticationFailure", "LocalflowCaptureFailing", "LocalflowMaterializationErrors",
                   "LocalflowHighProcessingLag", "LocalflowStorageQuotaExceeded"):
        assert wanted in names


def test_a_broken_expression_is_caught_by_the_rules_check() -> None:
    import promql_parser

    with pytest.raises(ValueError, match="parenthesis"):
        promql_parser.parse("sum(rate(localflow_errors_total[5m]) by (task)")


def _promtool_passes(command: str, path: Path, instead: str) -> None:
    """`promtool COMMAND rules PATH` exits 0; skipped (saying what covers it) without promtool."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed; {instead}")
    result = subprocess.run([promtool, command, "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_promtool_where_it_exists() -> None:
    _promtool_passes("check", ROOT / "deploy/prometheus/alerts.yml",
                     "test_every_alert_rule_parses_as_promql covers the expressions")


def _exported_metric_names() -> set[str]:
    from prometheus_client import REGISTRY

    import pipeline.telemetry.metrics  # noqa: F401 - registers every metric

    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
    return names


def _metrics_in(text: str) -> set[str]:
    return set(re.findall(r"\b(localflow_[a-z_]+)\b", text))


def test_every_dashboard_and_alert_metric_is_exported_by_the_code() -> None:
    exported = _exported_metric_names()
    # prometheus_client only lists samples of labelled metrics once they have children; accept the
    # family name plus the standard suffixes of its type.
    suffixes = ("_total", "_bucket", "_sum", "_count", "_created")
    def known(name: str) -> bool:
        return name in exported or any(name.endswith(s) and name[: -len(s)] in exported for s in suffixes)

    dashboard = (ROOT / "deploy/grafana/dashboards/localflow.json").read_text()
    used = _metrics_in(dashboard) | _metrics_in((ROOT / "deploy/prometheus/alerts.yml").read_text())
    assert used, "the dashboard queries no localflow metric"
    assert sorted(n for n in used if not known(n)) == []
    panels = [p["title"] for p in json.loads(dashboard)["panels"]]
    for topic in ("Documents per second", "lag", "Dead letters", "End-to-end latency", "Postgres rows", "Archive growth"):
        assert any(topic.lower() in t.lower() for t in panels), topic


def test_prometheus_finds_every_worker_by_dns_so_scaled_ones_too(compose: dict[str, Any]) -> None:
    """Static targets would name one container per service; Docker's DNS answers every replica."""
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert "static_configs" not in job
    (sd,) = job["dns_sd_configs"]
    workers = {n for n, cmd in _localflow_services(compose).items() if cmd[0] == "run"}
    assert set(sd["names"]) == workers and sd["type"] == "A" and sd["port"] == 9100
    assert {"source_labels": ["__meta_dns_name"], "target_label": "service"} in job["relabel_configs"]


def test_task_down_watches_the_scrape_too() -> None:
    """A dead container never reports `localflow_task_up 0`: the rule also fires on `up == 0` and on
    a service with no target left. tests/compose/alerts_test.yml shows it firing, run by promtool
    (here where it is installed, and always by `make test-compose`)."""
    (rule,) = [r for r in _alert_rules() if r["alert"] == "LocalflowTaskDown"]
    expr = " ".join(rule["expr"].split())
    assert 'up{job="localflow"} == 0' in expr and "localflow_task_up == 0" in expr and "unless" in expr
    _promtool_passes("test", ROOT / "tests/compose/alerts_test.yml", "make test-compose runs the rule unit test")


def test_dockerfile_is_small_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM ", text, re.M)
    assert len(stages) >= 2, "multi-stage build"
    final = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER (?!root)\S+", final, re.M), "the final stage runs as a non-root user"
    assert "HEALTHCHECK" in final and "/healthz" in final
    assert 'ENTRYPOINT ["localflow"]' in final
    assert "pip install" not in final and "gcc" not in final, "no build tools in the final stage"
