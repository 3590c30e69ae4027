"""Property-based API tests (schemathesis) against the OpenAPI schema a real `python -m service` serves: every route,
with authentication on (with and without a key) and off; no 5xx, and every status, content type, header and body is
the one the schema documents. Examples per route are bounded so that CI stays short."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from service.soak import ServerProcess, server_environment
from tests.service.conftest import record_url

KEY = "schemathesis-test-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
MODES = {"with_key": {"x-api-key": KEY}, "without_key": {}, "auth_disabled": {}}


@pytest.fixture(scope="module", params=list(MODES))
def served(request, tmp_path_factory):
    env = server_environment(record_url(), KEY, intra_op_threads=1)
    if request.param == "auth_disabled":
        del env["AEGIS_API_KEYS"]
        env["AEGIS_AUTH_DISABLED"] = "true"
    log = tmp_path_factory.mktemp("schemathesis") / "server.log"
    server = ServerProcess([], env, log).start()  # the embedded bundle: the API is under test, not the model
    try:
        yield server, MODES[request.param]
    finally:
        server.kill()


def _openapi() -> dict:
    from service.config import Settings
    from service.main import create_app

    return create_app(Settings(_env_file=None, auth_disabled=True, record_enabled=False), configure_logs=False).openapi()


# the schema is the app's own (known at collection time, so that every route is a test of its own); the first test
# checks that it is exactly what the running server serves
schema = schemathesis.openapi.from_dict(_openapi())
# STOW-RS bodies: arbitrary bytes under its media type (no boundary: the route must refuse them with a documented 4xx)
schemathesis.openapi.media_type('multipart/related; type="application/dicom"', st.binary(max_size=512))


def test_the_served_schema_is_the_one_under_test(served):
    server, _ = served
    import httpx

    # the schema is behind a key by default (AEGIS_DOCS_ACCESS=key); with auth disabled the key is ignored
    assert httpx.get(f"{server.url}/openapi.json", timeout=10, headers={"x-api-key": KEY}).json() == schema.raw_schema


@schema.parametrize()
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_every_route_answers_as_documented_and_never_5xx(case, served):
    server, headers = served
    case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS, timeout=30)
