"""API keys: 401 without or with a wrong key, 200 with a key from the environment or the key file."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.security import key_matches
from tests.service.conftest import png_bytes, serve


@pytest.fixture(scope="module")
def keyed(bundle_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# one key per line\nfile-key-3-0123456789\n\n", encoding="utf-8")
    with serve(bundle_dir, auth_disabled=False, api_keys="env-key-1-0123456789,env-key-2-0123456789", api_keys_file=key_file) as harness:
        yield harness


def test_missing_or_wrong_key_is_401(keyed, image_paths):
    data = png_bytes(image_paths[0])
    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}, {"authorization": "Basic env-key-1-0123456789"},
                    {"x-api-key": ""}, {"x-api-key": "env-key-1-0123456789 "}):
        response = keyed.post_image(data, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["reason"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert keyed.get("/v1/model").status_code == 401
    assert keyed.sample("aegis_diagnoses_total", {"diagnosis": "NORMAL", "decision": "accept"}) == 0


def test_valid_keys_from_env_and_file_are_accepted(keyed, image_paths):
    data = png_bytes(image_paths[0])
    for headers in ({"x-api-key": "env-key-1-0123456789"}, {"authorization": "Bearer env-key-2-0123456789"}, {"x-api-key": "file-key-3-0123456789"}):
        assert keyed.post_image(data, headers=headers).status_code == 200, headers
    assert keyed.get("/v1/model", headers={"x-api-key": "env-key-1-0123456789"}).status_code == 200


def test_probes_need_no_key_and_metrics_do(keyed):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/metrics").status_code == 401
    assert keyed.get("/metrics", headers={"x-api-key": "env-key-1-0123456789"}).status_code == 200


def test_auth_must_be_disabled_explicitly(bundle_dir, tmp_path):
    with pytest.raises(ValidationError, match="AEGIS_AUTH_DISABLED=true"):
        Settings(_env_file=None, bundle_dir=bundle_dir)
    empty = tmp_path / "keys"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="holds no key"):
        Settings(_env_file=None, api_keys_file=empty)
    assert Settings(_env_file=None, auth_disabled=True).all_api_keys() == ()


def test_keys_from_environment_variables(monkeypatch):
    a, b, c = ("key-a-0123456789abc", "key-b-0123456789abc", "key-c-0123456789abc")
    monkeypatch.setenv("AEGIS_API_KEYS", f"{a}, {b} ,{c} coarse")
    monkeypatch.setenv("AEGIS_MAX_BATCH_SIZE", "4")
    settings = Settings(_env_file=None)
    assert settings.all_api_keys() == (a.encode(), b.encode(), c.encode()) and settings.max_batch_size == 4
    assert settings.scoped_api_keys()[2] == (c.encode(), "coarse")
    assert a not in repr(settings.api_keys)  # secrets are not printed


def test_key_comparison_checks_every_key():
    assert key_matches("k2", (b"k1", b"k2"))
    assert not key_matches("k", (b"k1", b"k2")) and not key_matches("k1", ())
