"""A real Prometheus (Debian's `prometheus` package) scrapes the real service on loopback with the project's rule
files loaded (1 s scrape and evaluation interval): after rejected requests, the per-class rejection-rate recording
rule answers a non-zero value through the HTTP API; every rule evaluates without error, and every dashboard query
runs. Skipped without the binary on a developer machine; fails without it in CI (CI=true)."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from tests.deploy import promql_names as names
from tests.deploy.conftest import free_port, require_tool, wait_until

RATIO = "job_diagnosis:aegis_diagnoses_rejected_per_diagnoses:ratio_rate5m"
REJECTED = "job_diagnosis:aegis_diagnoses_rejected:rate5m"


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen, log_path):
        self.url, self.process, self.log_path = url, process, log_path

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params) -> dict:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


@pytest.fixture(scope="module")
def prometheus(services, tmp_path_factory):
    binary = require_tool("prometheus", shutil.which("prometheus"),
                          "apt-get install prometheus (scripts/ci-system-deps.sh)")
    root = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in names.rule_files()],
        "scrape_configs": [{"job_name": "aegis",  # the job name the rules and the compose config use
                            "static_configs": [{"targets": [s.target for s in services.values()]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = root / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}",
                                    f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                    "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        def ready():
            assert process.poll() is None, f"prometheus exited with {process.returncode}:\n{server.log_tail()}"
            return httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200

        wait_until(ready, timeout=30, what="prometheus /-/ready")
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def test_prometheus_scrapes_both_services(prometheus, services):
    def all_up():
        up = prometheus.query('up{job="aegis"}')
        return len(up) == len(services) and all(r["value"][1] == "1" for r in up)

    wait_until(all_up, timeout=20, what="both services up in Prometheus")


def test_rejection_rate_recording_rule_is_nonzero_after_rejections(prometheus, services, deploy_images):
    strict = services["strict"]
    rejected_classes = {a["diagnosis"] for a in strict.answers if a["decision"] == "reject"}
    assert rejected_classes
    # the counter must be in Prometheus before it grows: rate() cannot see the increase that created a series
    wait_until(lambda: prometheus.query('aegis_diagnoses_total{decision="reject"}'), timeout=20,
               what="the rejection counter scraped")
    time.sleep(1.5)  # at least one more scrape of the unchanged value
    for image in deploy_images:
        assert strict.diagnose(image)["decision"] == "reject"
    classes = {a["diagnosis"] for a in strict.answers}

    def ratios():
        result = {r["metric"]["diagnosis"]: float(r["value"][1]) for r in prometheus.query(f'{RATIO}{{job="aegis"}}')}
        return result if all(result.get(c, 0.0) > 0 for c in classes) else None

    ratio = wait_until(ratios, timeout=30, what=f"{RATIO} > 0 for {sorted(classes)}")
    for diagnosis in classes:
        assert 0 < ratio[diagnosis] <= 1
        rejected = prometheus.query(f'{REJECTED}{{job="aegis", diagnosis="{diagnosis}"}}')
        assert float(rejected[0]["value"][1]) > 0


def test_every_rule_is_loaded_and_evaluates_without_error(prometheus):
    expected = {rule.get("record") or rule["alert"] for rule in names.rules()}

    def evaluated():
        groups = prometheus.api("rules")["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        # the 1s-interval groups have run; the 30 s / 1 m groups (1h and 1d windows) may not have yet
        fast = [r for g in groups if g["interval"] <= 1 for r in g["rules"]]
        return rules if fast and all(r["health"] == "ok" for r in fast) else None

    rules = wait_until(evaluated, timeout=20, what="the 1 s rule groups evaluated")
    assert set(rules) == expected
    errors = {name: r.get("lastError") for name, r in rules.items() if r["health"] == "err"}
    assert not errors, f"rules that failed to evaluate: {errors}\n{prometheus.log_tail()}"


def test_every_dashboard_query_runs_in_prometheus(prometheus):
    failed = {}
    for where, expr in names.dashboard_expressions().items():
        response = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": names.grafana_to_promql(expr)},
                             timeout=10).json()
        if response.get("status") != "success":
            failed[where] = response.get("error")
    assert not failed, failed


def test_alert_expressions_run_in_prometheus(prometheus):
    failed = {}
    for rule in names.rules():
        if "alert" in rule:
            response = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": rule["expr"]}, timeout=10).json()
            if response.get("status") != "success":
                failed[rule["alert"]] = response.get("error")
    assert not failed, failed
