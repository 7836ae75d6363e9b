"""The Grafana dashboard and the Prometheus alert rules are queries a real Prometheus accepts,
over metrics the product serves, with labels those metrics carry; Prometheus scrapes every
service that serves them, and Grafana finds the dashboard and its data source."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from tests.unit.test_compose import SERVICES, option
from tests.unit.test_metrics import FakeRedis
from workers import admission, metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
DASHBOARD = json.loads((CONFIG / "grafana/dashboards/kling.json").read_text())
ALERTS = yaml.safe_load((CONFIG / "prometheus/alerts.yml").read_text())
PROMETHEUS = yaml.safe_load((CONFIG / "prometheus/prometheus.yml").read_text())
# Labels Prometheus attaches to every scraped sample.
TARGET_LABELS = {"instance", "job"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


class _Sessions:
    """Answers the scrape's queries with one row each: only the families' shapes matter."""

    def __call__(self) -> _Sessions:
        return self

    def __enter__(self) -> _Sessions:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def execute(self, *_: Any) -> Any:
        return SimpleNamespace(
            all=lambda: [(1, 1)], one=lambda: SimpleNamespace(in_flight=1, last_minute=1)
        )


def served() -> dict[str, set[str]]:
    """Every series name the product serves, with the labels it carries."""
    names: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            labels = set(metric._labelnames)
            for suffix in SUFFIXES.get(metric._type, ("",)):
                names[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    gate = admission.Gate(max_in_flight=2, per_minute=2, tenant_max_in_flight=2)
    backlog = metrics.BacklogCollector(_Sessions(), FakeRedis({}), gate=gate)  # type: ignore[arg-type]
    for family in backlog.collect():
        names[family.name] = {label for s in family.samples for label in s.labels}
    return names


def records() -> set[str]:
    return {
        rule["record"] for group in ALERTS["groups"] for rule in group["rules"] if "record" in rule
    }


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard and the rules."""
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for group in ALERTS["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule['record']!r}", rule["expr"]


def walk(node: Any) -> Iterator[Any]:
    yield node
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, str | int | float):
            yield from walk(child)
    for child in getattr(node, "args", None) or []:
        yield from walk(child)


def selectors(node: Any) -> Iterator[tuple[str, set[str]]]:
    for each in walk(node):
        if type(each).__name__ == "VectorSelector":
            yield each.name, {m.name for m in each.matchers.matchers}


def grouped_by(node: Any) -> Iterator[set[str]]:
    for each in walk(node):
        modifier = getattr(each, "modifier", None)
        if type(each).__name__ == "AggregateExpr" and modifier is not None:
            yield set(modifier.labels)


@pytest.mark.parametrize(("where", "query"), list(queries()))
def test_every_query_parses_and_names_served_metrics_and_their_labels(
    where: str, query: str
) -> None:
    expr = promql_parser.parse(query)  # raises on what Prometheus would refuse
    series = served()
    used: set[str] = set()
    for name, matched in selectors(expr):
        if name in records():
            continue
        assert name in series, f"{where}: {name} is not served (workers/metrics.py)"
        assert matched <= series[name] | TARGET_LABELS, f"{where}: {name} has no {matched}"
        used |= series[name]
    for labels in grouped_by(expr):
        assert labels <= used | TARGET_LABELS, f"{where}: grouped by {labels}, not on {used}"


def test_the_rules_alert_on_what_operators_asked_for() -> None:
    alerts = {
        rule["alert"]: rule for g in ALERTS["groups"] for rule in g["rules"] if "alert" in rule
    }
    assert {
        "KlingQueueGrowing", "KlingReconcilerResendsRising", "KlingCallbackFailureRate",
        "KlingSpendRate", "KlingWaveSpeedErrors",
    } <= alerts.keys()  # fmt: skip
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "page"}, name
        assert rule["annotations"]["summary"], name
        # Every {{ $labels.x }} an annotation shows is a label the alert's series carry.
        shown = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
        kept = set().union(*grouped_by(promql_parser.parse(rule["expr"])), *(
            served()[n] for n, _ in selectors(promql_parser.parse(rule["expr"])) if n in served()
        ))  # fmt: skip
        assert shown <= kept | TARGET_LABELS, name


def test_prometheus_scrapes_the_api_and_every_worker_service_and_loads_the_rules() -> None:
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    api_port = option(SERVICES["api"]["command"], "--port")
    assert jobs["api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    workers = {name for name, s in SERVICES.items() if "METRICS_PORT" in s.get("environment", {})}
    (discovery,) = jobs["workers"]["dns_sd_configs"]
    assert set(discovery["names"]) == workers
    assert {str(discovery["port"])} == {SERVICES[w]["environment"]["METRICS_PORT"] for w in workers}
    mounts = dict(
        v.split(":")[1::-1] for v in SERVICES["prometheus"]["volumes"] if v.startswith("./")
    )
    for path in PROMETHEUS["rule_files"] + ["/etc/prometheus/prometheus.yml"]:
        assert (ROOT / mounts[path]).is_file(), path


def test_grafana_provisions_the_dashboard_and_its_data_source() -> None:
    mounts = {
        inside: ROOT / outside
        for outside, inside, *_ in (v.split(":") for v in SERVICES["grafana"]["volumes"])
        if outside.startswith("./")
    }
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards/kling.yml").read_text())["providers"]
    assert (mounts[provider["options"]["path"]] / "kling.json").is_file()
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for p in DASHBOARD["panels"] for t in p.get("targets", [])}
    assert uids == {source["uid"]}
