"""The names cannot drift apart: every metric (and label) that the dashboard, the recording rules and the alerts use
exists in the real /metrics of the running service after real requests (accepted, rejected and refused)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy import promql_names as names

# (metric, label) pairs the rules use before the service exports them; each is a requested service change
PENDING_LABELS: set[tuple[str, str]] = set()


def _possible_values() -> dict[tuple[str, str], set[str]]:
    """Label values a CPU test run cannot show but the service can export, read from its settings' types."""
    from typing import get_args

    from service.config import Settings

    return {("aegis_model_info", "requested_device"): set(get_args(Settings.model_fields["device"].annotation))}


@pytest.fixture(scope="module")
def exported(services) -> dict[str, list[dict[str, str]]]:
    """sample name -> the label sets seen, over both services' real /metrics."""
    samples: dict[str, list[dict[str, str]]] = {}
    for service in services.values():
        for family in text_string_to_metric_families(service.metrics_text()):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def used_selectors() -> dict[str, list[names.Selector]]:
    expressions = {**{f"rule {k}": v for k, v in names.rule_expressions().items()},
                   **{f"dashboard {k}": v for k, v in names.dashboard_expressions().items()}}
    return {where: names.selectors(expr) for where, expr in expressions.items()}


def test_the_scanner_finds_metrics_and_matchers_only():
    found = names.selectors('sum by (job, le) (rate(aegis_x_bucket{a="1", b=~"$v|y"}[$__rate_interval] offset 1h))'
                            ' / on (job) group_left (name) aegis_info > bool 1e9 and histogram_quantile(0.5, m)')
    assert found == [names.Selector("aegis_x_bucket", (("a", "=", "1"), ("b", "=~", "$v|y"))),
                     names.Selector("aegis_info"), names.Selector("m")]


def test_monitoring_files_use_metrics_at_all():
    used = {s.metric for selectors in used_selectors().values() for s in selectors}
    assert {"aegis_diagnoses_total", "aegis_shield_logit_bucket", "aegis_ready"} <= used


def test_every_metric_used_by_dashboard_and_rules_is_exported(exported):
    recorded = names.recorded_names()
    missing = {}
    for where, selectors in used_selectors().items():
        for selector in selectors:
            known = selector.metric in exported or selector.metric in recorded \
                or selector.metric in names.PROMETHEUS_SERIES
            if not known:
                missing.setdefault(selector.metric, []).append(where)
    assert not missing, f"metrics used but neither exported by the service nor recorded by a rule: {missing}"


def test_every_label_matched_on_a_service_metric_is_exported(exported):
    missing = {}
    for where, selectors in used_selectors().items():
        for selector in selectors:
            if selector.metric not in exported:
                continue
            labels = set().union(*(set(s) for s in exported[selector.metric]))
            for label, op, value in selector.matchers:
                if label in names.TARGET_LABELS or (selector.metric, label) in PENDING_LABELS:
                    continue
                if label not in labels:
                    missing.setdefault(f"{selector.metric}{{{label}}}", []).append(where)
                elif op == "=" and "$" not in value and value not in {s.get(label) for s in exported[selector.metric]} \
                        and value not in _possible_values().get((selector.metric, label), set()):
                    missing.setdefault(f'{selector.metric}{{{label}="{value}"}} (value never seen)', []).append(where)
    assert not missing, f"label matchers on labels or values the service does not export: {missing}"


def test_every_recording_rule_is_used_or_is_a_building_block():
    """A recorded series nobody reads is dead weight: each is used by an alert, the dashboard or another rule."""
    used = {s.metric for selectors in used_selectors().values() for s in selectors}
    unused = names.recorded_names() - used
    assert not unused, f"recording rules used by no alert, dashboard panel or rule: {sorted(unused)}"


def test_real_requests_gave_both_decisions(services, exported):
    decisions = {s["decision"] for s in exported["aegis_diagnoses_total"]}
    assert decisions == {"accept", "reject"}
    assert {s["reason"] for s in exported["aegis_request_errors_total"]} >= {"unsupported_media_type", "unauthorized"}
