"""The operator's kit: alert rules that promtool loads and whose unit tests pass, and a
dashboard and rules that name only metrics s3proxy exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from s3proxy.metrics import IngestMetrics, Metrics

from .conftest import require_tool

CONFIG = Path(__file__).resolve().parent.parent / "config"
_NAME = re.compile(r"\b((?:s3proxy|process|python)_[a-z0-9_]+)")


SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
    "summary": ("", "_count", "_sum"),
}


def exported() -> set[str]:
    """Every sample name the exporter can write (counters with _total, histogram parts),
    labelled families included before any of their labels has a value."""
    return {
        family.name + suffix
        for registry in (Metrics().registry, IngestMetrics().registry)
        for family in registry.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def names_in(expression: str) -> set[str]:
    return set(_NAME.findall(expression))


def test_promtool_loads_the_rules_and_their_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        result = subprocess.run(
            [promtool, *args], cwd=CONFIG, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout
        print(result.stdout)  # shown with -s: the note quotes it


def test_every_alert_has_a_unit_test_and_names_no_job() -> None:
    rules = [
        r for g in yaml.safe_load((CONFIG / "alerts.yml").read_text())["groups"] for r in g["rules"]
    ]
    tested = {
        case["alertname"]
        for test in yaml.safe_load((CONFIG / "alerts.test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert {r["alert"] for r in rules} == tested
    assert all("job=" not in r["expr"] for r in rules)


def test_the_rules_and_the_dashboard_name_only_exported_metrics() -> None:
    known = exported()
    rules = [
        r["expr"]
        for g in yaml.safe_load((CONFIG / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
    ]
    dashboard = json.loads((CONFIG / "grafana" / "s3proxy.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(queries) > 10
    for expression in rules + queries:
        unknown = names_in(expression) - known
        assert not unknown, f"{unknown} in {expression}"


@pytest.mark.parametrize(
    ("name", "stop_above", "cache"),
    [("s3proxy.service", 8, "s3proxy"), ("s3proxy-ingest.service", 35, "s3proxy-ingest")],
)
def test_the_systemd_units_verify(tmp_path: Path, name: str, stop_above: int, cache: str) -> None:
    import shutil
    import sys

    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # "where systemd is installed": not a tool CI must have
        pytest.skip("systemd-analyze is not installed")
    unit = (CONFIG / name).read_text()
    for needed in (
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        f"CacheDirectory={cache}",
        "ExecReload=/bin/kill -HUP",
    ):
        assert needed in unit, needed
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))  # type: ignore[union-attr]
    assert stop > stop_above, "above the default drain (shutdown_timeout_s and the rest)"
    here = Path(sys.executable).parent / "s3proxy"  # the unit's binary, as installed here
    path = tmp_path / name
    path.write_text(unit.replace("/opt/s3proxy/bin/s3proxy", str(here)))
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if name in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
