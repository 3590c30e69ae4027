"""The review page in a real headless browser (Debian's chromium driven by Playwright) against a real server: API key
entered once, real X-rays (PNG and DICOM) diagnosed as the bundle's own rule says, garbage refused with a readable
message, the model card opened, a schema 1.0 bundle without the clean logit distribution, and the API behind it.

The screenshot of the page after a real X-ray lands in test-artifacts/review-page.png (git-ignored; CI keeps it).
"""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from models.bundle import DEFAULT_BUNDLE_DIR, load_bundle, write_manifest
from service.review import markdown_to_html
from tests.service.conftest import REPO, SAMPLES, OfflineReference, serve
from tests.service.dicom_factory import make_dicom
from tests.service.real_server import real_server

KEY = "review-page-test-key"
ARTIFACTS = REPO / "test-artifacts"
VIEWPORT = {"width": 1280, "height": 800}
NORMAL, PNEUMONIA = sorted(SAMPLES)  # normal-IM-0001-0001.png, pneumonia-person100_bacteria_475.png


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's chromium is not installed (scripts/ci-system-deps.sh installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)  # never `playwright install`
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def default_reference() -> OfflineReference:
    return OfflineReference(DEFAULT_BUNDLE_DIR)


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory):
    """The default bundle as a schema 1.0 bundle: no clean logit distribution in its manifest."""
    root = shutil.copytree(DEFAULT_BUNDLE_DIR, tmp_path_factory.mktemp("schema-1.0") / "bundle")
    manifest = load_bundle(root).manifest
    calibration = manifest.calibration.model_copy(update={"clean_logits": {}})
    write_manifest(root, manifest.model_copy(update={"schema_version": "1.0", "calibration": calibration}))
    return root


def _service_env(tmp_path, **extra) -> dict[str, str]:
    return {"AEGIS_INTRA_OP_THREADS": "1", "AEGIS_RECORD_URL": f"sqlite:///{tmp_path}/records.sqlite", **extra}


def _upload(page, name: str, data: bytes, mime: str) -> None:
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


def _wait_for_result(page, request_ids: set[str]) -> str:
    """Wait until the page shows a new answer; returns its request id."""
    page.wait_for_function("ids => { const m = document.getElementById('meta').textContent;"
                           " return m && !ids.some(id => m.endsWith(id)); }", arg=sorted(request_ids))
    request_id = page.text_content("#meta").rsplit(" ", 1)[-1]
    request_ids.add(request_id)
    return request_id


def _expect_verdict(page, expected: dict) -> None:
    assert page.text_content("#diagnosis") == expected["diagnosis"]
    decision = page.text_content("#decision strong")
    if expected["decision"] == "accept":
        assert decision == "Passed the safety check"
    else:
        assert decision == "Not checked as trustworthy — review manually"
    assert f"this image: {expected['shield_logit']:.2f}" in page.text_content("#plot svg")
    for image in ("#uploaded", "#model-input"):  # both images were decoded by the browser
        assert page.eval_on_selector(image, "img => img.complete && img.naturalWidth > 0")


def test_review_page_with_an_api_key(browser, default_reference, tmp_path):
    with real_server(DEFAULT_BUNDLE_DIR, tmp_path, **_service_env(tmp_path, AEGIS_API_KEYS=KEY)) as (_, base, _):
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(base + "/")
        page.wait_for_selector("#key-form", state="visible")
        page.fill("#api-key", "wrong-key")
        page.click("#key-form button")
        page.wait_for_function("() => document.getElementById('key-message').textContent.includes('not accepted')")
        page.fill("#api-key", KEY)
        page.click("#key-form button")
        page.wait_for_selector("#key-form", state="hidden")
        assert page.text_content("#model-name") == "Model: aegis-kermany-resnet18-64 2.2.0"

        seen: set[str] = set()
        # a real X-ray as PNG; the page's answer is the bundle's rule computed without service code
        _upload(page, NORMAL.name, NORMAL.read_bytes(), "image/png")
        _wait_for_result(page, seen)
        _expect_verdict(page, default_reference.answer(Image.open(NORMAL)))
        assert page.locator("#plot svg rect.histogram").count() == 20
        assert "clean validation X-rays the model diagnosed as" in page.text_content("#plot-caption")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "review-page.png"))

        # the same X-ray as a DICOM (the browser cannot show DICOM: the service's decoded preview is shown)
        dicom = make_dicom(np.asarray(Image.open(PNEUMONIA).convert("L")))
        _upload(page, "study.dcm", dicom, "application/dicom")
        _wait_for_result(page, seen)
        _expect_verdict(page, default_reference.answer(Image.open(PNEUMONIA)))
        assert page.text_content("#uploaded-caption").startswith("Uploaded DICOM")
        page.screenshot(path=str(ARTIFACTS / "review-page-dicom.png"))

        # garbage: a readable refusal, and the previous answer cleared so that it cannot be taken for this file's
        _upload(page, "notes.png", b"this is not an image at all", "image/png")
        page.wait_for_selector("#error", state="visible")
        error = page.text_content("#error")
        assert error.startswith("This file could not be diagnosed: unrecognised image bytes")
        assert page.is_hidden("#result") and page.is_hidden("#images")
        page.screenshot(path=str(ARTIFACTS / "review-page-error.png"))

        # the model card, fetched with the key, in a dialog
        page.click("#card-link")
        page.wait_for_selector("#document[open]")
        assert "Not a medical device" in page.text_content("#document-body")
        page.click("#document button")

        # the key is kept for the tab: a reload asks for nothing
        page.reload()
        page.wait_for_function("() => document.getElementById('model-name').textContent.includes('2.2.0')")
        assert page.is_hidden("#key-form")
        context.close()


def test_review_page_without_auth_and_an_old_bundle(browser, default_reference, old_bundle, tmp_path):
    with real_server(old_bundle, tmp_path, **_service_env(tmp_path, AEGIS_AUTH_DISABLED="true")) as (_, base, _):
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(base + "/")
        page.wait_for_function("() => document.getElementById('model-name').textContent.includes('2.2.0')")
        assert page.is_hidden("#key-form")
        _upload(page, PNEUMONIA.name, PNEUMONIA.read_bytes(), "image/png")
        _wait_for_result(page, set())
        _expect_verdict(page, default_reference.answer(Image.open(PNEUMONIA)))
        assert page.locator("#plot svg rect.histogram").count() == 0
        assert "distribution of clean validation scores is unavailable" in page.text_content("#plot-caption")
        page.close()


# ------------------------------------------------------------------------------------- the API behind the page

def _data_url_image(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_diagnose_returns_the_model_input_it_judged_when_asked(bundle_dir, reference, image_paths):
    path = image_paths[-1]
    with serve(bundle_dir) as service:
        plain = service.post_image(path.read_bytes()).json()
        assert "images" not in plain  # only when asked (answers omit what they do not carry)
        body = service.post_image(path.read_bytes(), url="/v1/diagnose?images=true").json()
    expected = reference.answer(Image.open(path))
    model_input = _data_url_image(body["images"]["model_input"])
    np.testing.assert_array_equal(model_input, np.rint(expected["x"][0, 0] * 255).astype(np.uint8))
    uploaded = _data_url_image(body["images"]["uploaded"])
    source = Image.open(path)
    assert max(uploaded.shape[:2]) == min(512, max(source.size))
    assert body["shield_logit"] == pytest.approx(expected["shield_logit"], abs=1e-6)


def test_model_documents_need_the_key_and_come_as_markdown_or_html(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    with serve(bundle_dir, auth_disabled=False, api_keys=(KEY,)) as service:
        assert service.get("/v1/model/card").status_code == 401
        card = service.get("/v1/model/card", headers={"x-api-key": KEY})
        assert card.headers["content-type"].startswith("text/markdown") and card.text == bundle.model_card()
        html = service.get("/v1/model/card?format=html", headers={"x-api-key": KEY})
        assert html.headers["content-type"].startswith("text/html") and "<h1>" in html.text
        missing = service.get("/v1/model/security-report", headers={"x-api-key": KEY})
        assert missing.status_code == 404 and missing.json()["reason"] == "document_missing"
        page = service.get("/")  # the page and its assets need no key
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        assert service.get("/static/review.js").status_code == 200


def test_model_documents_escape_raw_html(tmp_path):
    html = markdown_to_html("# Card\n\n<script>alert(1)</script>\n\n[x](javascript:alert(1))\n\n| a |\n|---|\n| 1 |")
    assert "<script>" not in html and "&lt;script&gt;" in html and "<table>" in html
    assert "href=\"javascript" not in html  # markdown-it refuses the link
