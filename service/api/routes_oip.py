"""The Open Inference Protocol (KServe v2 / Triton) health and metadata paths, so existing probes work unchanged.

The health paths are open (probes); server and model metadata need an API key (they name the model to a stranger).

Inference itself stays on /v1/diagnose: the product is the per-request accept/reject decision, not raw tensors.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import ApiKeyDep, StateDep
from service.api.routes_health import readiness
from service.api.schemas import (THROTTLED, ErrorResponse, OipError, OipLive, OipModelMetadata, OipReady,
                                 OipServerMetadata, OipTensor)

router = APIRouter(prefix="/v2", tags=["open inference protocol"], responses=THROTTLED)
SERVER_NAME = "medical-aegis"
AUTH_ERRORS = {401: {"model": ErrorResponse}, 429: {"model": ErrorResponse}}


@router.get("", response_model=OipServerMetadata, responses=AUTH_ERRORS, summary="OIP server metadata")
async def server_metadata(_auth: ApiKeyDep) -> OipServerMetadata:
    from importlib.metadata import PackageNotFoundError, version

    try:
        server_version = version("medical-aegis")
    except PackageNotFoundError:
        server_version = "0+unknown"
    return OipServerMetadata(name=SERVER_NAME, version=server_version, extensions=[])


@router.get("/health/live", response_model=OipLive, summary="OIP liveness")
async def live() -> OipLive:
    return OipLive(live=True)


@router.get("/health/ready", response_model=OipReady, responses={503: {"model": OipReady}}, summary="OIP readiness")
async def ready(state: StateDep):
    is_ready = readiness(state) == "ready"
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


def _metadata(state, name: str, version: str | None):
    bundle = state.bundle
    if bundle is None:
        return JSONResponse({"error": "the model is not loaded yet"}, status_code=503)
    m = bundle.manifest
    if name != m.name or (version is not None and version != m.version):
        wanted = name if version is None else f"{name} version {version}"
        return JSONResponse({"error": f"unknown model {wanted!r}; this server serves {m.name!r} version "
                                      f"{m.version!r}"}, status_code=404)
    k = len(m.classes)
    return OipModelMetadata(
        name=m.name, versions=[m.version], platform="onnxruntime_onnx",
        inputs=[OipTensor(name=m.onnx.input, datatype="FP32",
                          shape=[-1, m.input.channels, m.input.height, m.input.width])],
        outputs=[OipTensor(name=out, datatype="FP32", shape=[-1, k]) for out in m.onnx.outputs],
    )


@router.get("/models/{name}", response_model=OipModelMetadata, responses=AUTH_ERRORS | {404: {"model": OipError}},
            summary="OIP model metadata")
async def model_metadata(name: str, state: StateDep, _auth: ApiKeyDep):
    return _metadata(state, name, None)


@router.get("/models/{name}/versions/{version}", response_model=OipModelMetadata,
            responses=AUTH_ERRORS | {404: {"model": OipError}}, summary="OIP model metadata of one version")
async def model_version_metadata(name: str, version: str, state: StateDep, _auth: ApiKeyDep):
    return _metadata(state, name, version)


@router.get("/models/{name}/ready", response_model=OipReady, responses=AUTH_ERRORS | {404: {"model": OipError}},
            summary="OIP model readiness")
async def model_ready(name: str, state: StateDep, _auth: ApiKeyDep):
    bundle = state.bundle
    if bundle is not None and name != bundle.manifest.name:
        return JSONResponse({"error": f"unknown model {name!r}"}, status_code=404)
    is_ready = readiness(state) == "ready"
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)
