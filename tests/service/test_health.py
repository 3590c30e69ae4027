"""Readiness really checks (503 before warm-up and while draining), OIP paths, /v1/model, OpenAPI."""

from __future__ import annotations

import json

from models.bundle import load_bundle
from service.main import create_app
from tests.service.conftest import Harness, copy_bundle, make_settings, png_bytes, serve


def test_readyz_is_503_before_the_lifespan_has_loaded_and_warmed_up(bundle_dir, image_paths):
    app = create_app(make_settings(bundle_dir))
    with Harness(app, lifespan=False) as cold:
        assert cold.get("/healthz").status_code == 200
        ready = cold.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "not_ready"}
        assert cold.get("/v2/health/ready").status_code == 503
        assert cold.get("/v2/health/live").json() == {"live": True}
        response = cold.post_image(png_bytes(image_paths[0]))
        assert response.status_code == 503 and response.json()["reason"] == "not_ready"
        assert cold.sample("aegis_ready") == 0


def test_readyz_is_200_after_warm_up_and_503_at_once_when_draining(bundle_dir, image_paths):
    with serve(bundle_dir) as harness:
        assert harness.get("/readyz").json() == {"status": "ready"}
        assert harness.get("/v2/health/ready").json() == {"ready": True}
        harness.state.start_draining()
        assert harness.get("/readyz").status_code == 503 and harness.get("/readyz").json()["status"] == "draining"
        assert harness.get("/v2/health/ready").status_code == 503
        assert harness.sample("aegis_ready") == 0
        # requests already on their way are still served while the load balancer takes the pod out
        assert harness.post_image(png_bytes(image_paths[0])).status_code == 200


def test_oip_model_metadata(service, reference):
    m = reference.manifest
    body = service.get(f"/v2/models/{m.name}").json()
    assert body == {
        "name": m.name, "versions": [m.version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, m.input.channels, m.input.height,
                                                                     m.input.width]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]},
                    {"name": "shield_logits", "datatype": "FP32", "shape": [-1, 2]}],
    }
    assert service.get(f"/v2/models/{m.name}/versions/{m.version}").status_code == 200
    assert service.get(f"/v2/models/{m.name}/ready").json() == {"ready": True}
    for path in ("/v2/models/resnet50", f"/v2/models/{m.name}/versions/9.9", "/v2/models/other/ready"):
        missing = service.get(path)
        assert missing.status_code == 404 and "error" in missing.json(), path
    assert service.get("/v2").json()["name"] == "medical-aegis"


def test_v1_model_returns_manifest_card_and_security_report(service, reference, bundle_dir, tmp_path):
    body = service.get("/v1/model").json()
    assert body["manifest"]["name"] == reference.manifest.name
    assert body["manifest"]["thresholds"] == reference.manifest.thresholds
    assert body["model_card"] == reference.bundle.model_card()
    assert body["security_report"] is None and body["provider"] == "CPUExecutionProvider"

    report = {"attacks": {"pgd20": {"bypass": 0.5}}}
    root = tmp_path / "with-report"
    import shutil

    shutil.copytree(bundle_dir, root)
    (root / "security_report.json").write_text(json.dumps(report), encoding="utf-8")
    copy_target = tmp_path / "final"
    manifest = load_bundle(bundle_dir).manifest
    from models.bundle import write_manifest

    write_manifest(root, manifest.model_copy(update={"reports": {"security_report": "security_report.json"}}))
    shutil.move(root, copy_target)
    with serve(copy_target) as harness:
        assert harness.get("/v1/model").json()["security_report"] == report


def test_openapi_documents_the_endpoints(service):
    spec = service.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/diagnose", "/v1/diagnose", "/v1/model", "/healthz", "/readyz", "/metrics", "/v2/health/live",
                 "/v2/health/ready", "/v2/models/{name}"):
        assert path in paths, path
    body = paths["/v1/diagnose"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "application/dicom"} <= set(body)
    assert {"413", "415", "422", "503"} <= set(paths["/v1/diagnose"]["post"]["responses"])
    assert "decision" in spec["components"]["schemas"]["DiagnoseResponse"]["properties"]


def test_a_broken_bundle_refuses_to_start(bundle_dir, tmp_path):
    import pytest

    from models.bundle import BundleError

    root = copy_bundle(bundle_dir, tmp_path / "b")
    (root / "MODEL_CARD.md").write_text("tampered", encoding="utf-8")
    app = create_app(make_settings(root))
    with pytest.raises(BundleError, match="modified"):
        with Harness(app):
            pass
