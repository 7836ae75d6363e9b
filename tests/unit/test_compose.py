"""docker-compose.yml and the Dockerfile describe something that can run: every command names
a module, app, queue or subcommand that exists, every image is real, the image holds every
package the commands import, every app service waits for what it needs, health checks check
what they claim to, and a stopped worker has time to finish its longest task."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from api.cli import app as cli_app
from config.settings import settings_from
from workers.celery_app import create_celery
from workers.dispatch import QUEUES, ROUTES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OUR_IMAGE = "kling-pipeline"
# Public images the file may pull, by name without the tag.
KNOWN_IMAGES = {
    "postgres",
    "redis",
    "minio/minio",
    "minio/mc",
    "mher/flower",
    "prom/prometheus",
    "grafana/grafana",
}


def ours(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith(OUR_IMAGE)


APP_SERVICES = {name: s for name, s in SERVICES.items() if ours(s)}


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def copied() -> set[str]:
    """Top-level paths the Dockerfile copies into the image."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    sources = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    return {Path(src).parts[0] for group in sources for src in group}


def check_command(argv: list[str]) -> list[str]:
    """The modules a command of our image imports first; raises if it names nothing real."""
    program = argv[0]
    if program == "celery":
        assert argv[argv.index("-A") + 2] in ("worker", "beat")
        if "-Q" in argv:
            assert set(option(argv, "-Q").split(",")) <= set(QUEUES), argv
        return [option(argv, "-A")]
    if program == "uvicorn":
        module, _, factory = argv[1].partition(":")
        assert "--factory" in argv
        assert callable(getattr(importlib.import_module(module), factory))
        return [module]
    if program == "kling":
        names = typer.main.get_command(cli_app).commands  # type: ignore[attr-defined]
        assert argv[1] in names, f"kling has no {argv[1]!r} command"
        return ["api.cli"]
    if program == "python" and argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, argv
        return [argv[2]]
    raise AssertionError(f"unknown program in {argv}")


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_commands_name_things_that_exist(name: str) -> None:
    for module in check_command(APP_SERVICES[name]["command"]):
        importlib.import_module(module)


def imported_from_repo(modules: list[str]) -> set[str]:
    """Top-level repository paths a fresh interpreter loads to import `modules` (a fresh one:
    this test process has imported far more, tests and benchmarks included)."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=True)
    files = [Path(f) for f in json.loads(out.stdout) if f]
    tops = {f.relative_to(ROOT).parts[0] for f in files if f.is_relative_to(ROOT)}
    return {top for top in tops if not top.startswith(".")}  # not .venv


def test_the_image_holds_every_package_the_commands_import() -> None:
    modules = [m for s in APP_SERVICES.values() for m in check_command(s["command"])]
    # Alembic reads `migrations/` at run time, without importing it first.
    needed = imported_from_repo(modules) | {"migrations"}
    assert needed <= copied(), needed - copied()


def test_images_are_real() -> None:
    for name, service in SERVICES.items():
        image = str(service.get("image", ""))
        assert ours(service) or re.sub(r":[\w.-]+$", "", image) in KNOWN_IMAGES, name


def test_app_services_wait_for_what_they_need() -> None:
    for name, service in APP_SERVICES.items():
        depends = service.get("depends_on") or {}
        conditions = all("condition" in d for d in depends.values()) and depends
        assert "healthcheck" in service or conditions, name


def test_every_queue_has_a_worker_with_a_metrics_port_and_its_own_directory() -> None:
    workers = [s for s in APP_SERVICES.values() if s["command"][3:4] == ["worker"]]
    consumed = {q for s in workers for q in option(s["command"], "-Q").split(",")}
    assert consumed == set(QUEUES)
    for service in workers:
        env = service["environment"]
        assert env["METRICS_PORT"] and env["PROMETHEUS_MULTIPROC_DIR"] in service["tmpfs"]


def test_redis_keeps_an_append_only_file_and_the_bucket_is_created() -> None:
    assert "--appendonly" in SERVICES["redis"]["command"]
    bucket = APP_SERVICES["api"]["environment"]["S3_BUCKET"]
    makers = [s for s in SERVICES.values() if str(s.get("image", "")).startswith("minio/mc")]
    assert any(f"mb --ignore-existing local/{bucket}" in " ".join(s["command"]) for s in makers)
    assert SERVICES["simulator"]["profiles"] == ["sandbox"]


def test_every_app_service_takes_secret_keys_from_the_environment_and_requires_it() -> None:
    # No default: a key written in this file would seal every deployment's secrets alike.
    for name, service in APP_SERVICES.items():
        assert re.fullmatch(r"\$\{SECRET_KEYS:\?.+\}", service["environment"]["SECRET_KEYS"]), name


def test_every_app_service_passes_the_trace_endpoint_through_and_is_off_without_it() -> None:
    # One variable turns traces on across the fleet; empty (the default) leaves them off.
    for name, service in APP_SERVICES.items():
        endpoint = service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}", name


WORKERS = {name: s for name, s in APP_SERVICES.items() if s["command"][3:4] == ["worker"]}


def test_every_queue_has_a_worker_service_of_its_own() -> None:
    # The reconciler's queue too: a backlog of one queue never delays another's tasks.
    queues = [option(s["command"], "-Q") for s in WORKERS.values()]
    assert sorted(queues) == sorted(QUEUES)


def test_worker_health_checks_ping_their_own_node_through_the_broker() -> None:
    for name, service in WORKERS.items():
        node = option(service["command"], "-n").replace("%h", "$$HOSTNAME")
        kind, script = service["healthcheck"]["test"]
        assert kind == "CMD-SHELL", name
        assert script.startswith("celery -A workers.celery_app inspect ping "), name
        assert f" -d {node} " in f"{script} ", name
        assert int(option(script.split(), "-t")) < seconds(service["healthcheck"]["timeout"])


def test_the_api_is_healthy_only_when_ready() -> None:
    assert "/readyz" in " ".join(APP_SERVICES["api"]["healthcheck"]["test"])


def seconds(duration: str) -> float:
    """A compose duration (`1m30s`, `15m`, `20s`) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def hard_time_limit(queue: str) -> float:
    """The longest a task on `queue` can run before Celery kills it, as compose runs it (the
    limits are settings compose leaves at their defaults)."""
    conf = create_celery(settings_from({})).conf
    return max(
        conf.task_annotations.get(task, {}).get("time_limit", conf.task_time_limit)
        for task, routed in ROUTES.items()
        if routed == queue
    )


def test_a_stopped_worker_has_time_to_finish_its_longest_task() -> None:
    for name, service in WORKERS.items():
        env = service["environment"]
        limits = {k for k in env if k.endswith("TIME_LIMIT_SECONDS") or k == "STORE_STALL_SECONDS"}
        assert not limits, f"{name} sets {limits}: derive the limits from them"
        longest = max(hard_time_limit(q) for q in option(service["command"], "-Q").split(","))
        assert seconds(service["stop_grace_period"]) > longest, name
    assert hard_time_limit("store") == 840.0  # STORE_STALL_SECONDS' default less 60 s


def test_flower_asks_for_basic_auth_from_a_variable_without_default() -> None:
    auth = SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?.+\}", auth)
