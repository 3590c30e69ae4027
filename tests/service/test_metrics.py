"""Prometheus metrics move exactly as asserted, on an isolated registry per app; names follow the conventions."""

from __future__ import annotations

import re

import pytest

from tests.service.conftest import png_bytes, serve

STAGES = ("decode", "prepare", "cushion", "queue", "inference", "total")


@pytest.fixture(scope="module")
def rejecting(reject_all_bundle):
    with serve(reject_all_bundle) as harness:
        yield harness


def _bucket_of(reference, path) -> float:
    from PIL import Image

    from service.metrics import SHIELD_LOGIT_BUCKETS

    shield = reference.answer(Image.open(path))["shield_logit"]
    return next(b for b in SHIELD_LOGIT_BUCKETS if shield <= b)


def test_one_rejected_request_moves_the_reject_counter_by_exactly_one(rejecting, reference, image_paths):
    from PIL import Image

    path = image_paths[0]
    diagnosis = reference.answer(Image.open(path))["diagnosis"]
    labels = {"diagnosis": diagnosis, "decision": "reject"}
    before = {
        "reject": rejecting.sample("aegis_diagnoses_total", labels),
        "accept": rejecting.sample("aegis_diagnoses_total", {"diagnosis": diagnosis, "decision": "accept"}),
        "shield": rejecting.sample("aegis_shield_logit_count", {"predicted_class": diagnosis}),
        "bucket": rejecting.sample("aegis_shield_logit_bucket", {"predicted_class": diagnosis,
                                                                  "le": str(_bucket_of(reference, path))}),
        "requests": rejecting.sample("aegis_requests_total", {"route": "/v1/diagnose", "status": "200"}),
        "batches": rejecting.sample("aegis_batch_size_count"),
        **{s: rejecting.sample("aegis_stage_duration_seconds_count", {"stage": s}) for s in STAGES},
    }
    body = rejecting.post_image(png_bytes(path)).json()
    assert body["decision"] == "reject" and body["diagnosis"] == diagnosis and body["threshold"] == 1e9
    assert rejecting.sample("aegis_diagnoses_total", labels) == before["reject"] + 1
    assert rejecting.sample("aegis_diagnoses_total", {"diagnosis": diagnosis, "decision": "accept"}) == \
           before["accept"]
    assert rejecting.sample("aegis_shield_logit_count", {"predicted_class": diagnosis}) == before["shield"] + 1
    # the observation landed in the right bucket (negative buckets: OpenMetrics exposes no _sum for this histogram)
    from service.metrics import SHIELD_LOGIT_BUCKETS

    le = next(b for b in SHIELD_LOGIT_BUCKETS if body["shield_logit"] <= b)
    bucket = {"predicted_class": diagnosis, "le": str(le)}
    assert rejecting.sample("aegis_shield_logit_bucket", bucket) == before["bucket"] + 1
    assert rejecting.sample("aegis_requests_total", {"route": "/v1/diagnose", "status": "200"}) == \
           before["requests"] + 1
    assert rejecting.sample("aegis_batch_size_count") == before["batches"] + 1
    for stage in STAGES:
        assert rejecting.sample("aegis_stage_duration_seconds_count", {"stage": stage}) == before[stage] + 1


def test_accepts_and_errors_are_counted_by_label(accept_all_bundle, image_paths):
    with serve(accept_all_bundle) as harness:
        for path in image_paths[:3]:
            assert harness.post_image(png_bytes(path)).json()["decision"] == "accept"
        harness.post_image(b"plain text", content_type="text/plain")
        harness.post_image(b"")
        accepted = sum(harness.sample("aegis_diagnoses_total", {"diagnosis": c, "decision": "accept"})
                       for c in ("NORMAL", "PNEUMONIA"))
        rejected = sum(harness.sample("aegis_diagnoses_total", {"diagnosis": c, "decision": "reject"})
                       for c in ("NORMAL", "PNEUMONIA"))
        assert (accepted, rejected) == (3, 0)
        assert harness.sample("aegis_request_errors_total", {"reason": "unsupported_media_type"}) == 1
        assert harness.sample("aegis_request_errors_total", {"reason": "empty_body"}) == 1
        assert harness.sample("aegis_requests_total", {"route": "/v1/diagnose", "status": "415"}) == 1
        assert harness.sample("aegis_requests_total", {"route": "/v1/diagnose", "status": "422"}) == 1
        assert harness.sample("aegis_inflight_requests") == 0
        assert harness.sample("aegis_queue_depth") == 0


def test_model_info_and_ready_gauges(service, reference):
    m, bundle = reference.manifest, reference.bundle
    assert service.sample("aegis_model_info", {"name": m.name, "version": m.version,
                                               "provider": "CPUExecutionProvider", "requested_device": "cpu",
                                               "bundle_digest": bundle.digest, "bundle_signature": "unsigned"}) == 1
    assert service.sample("aegis_ready") == 1


def test_metrics_endpoint_exposes_the_documented_names(service, image_paths):
    service.post_image(png_bytes(image_paths[0]))
    text = service.get("/metrics").text
    for name in ("aegis_requests_total", "aegis_request_duration_seconds_bucket", "aegis_diagnoses_total",
                 "aegis_shield_logit_bucket", "aegis_stage_duration_seconds_bucket", "aegis_batch_size_bucket",
                 "aegis_queue_depth", "aegis_inflight_requests", "aegis_ready", "aegis_model_info"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    import service.metrics as metrics_module

    for family in service.registry.collect():  # every aegis metric is documented in the module docstring
        if family.name.startswith("aegis_"):
            exposed = family.name + ("_total" if family.type == "counter" else "")
            assert exposed in metrics_module.__doc__, exposed


def test_metric_names_follow_prometheus_conventions(service):
    units = ("_seconds", "_bytes")
    for family in service.registry.collect():
        name = family.name
        if not name.startswith("aegis_"):
            assert name.startswith(("process_", "python_")), name
            continue
        assert re.fullmatch(r"aegis_[a-z][a-z0-9_]*", name) and ":" not in name, name
        assert not name.endswith("_total"), f"{name}: client adds _total to counters itself"
        if family.type == "histogram" and "duration" in name:
            assert name.endswith(units), name
        for sample in family.samples:
            assert "request_id" not in sample.labels and "path" not in sample.labels
