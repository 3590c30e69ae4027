"""ONNX Runtime provider selection, and the torch-free / training-free import contract of the service."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import onnxruntime as ort
import pytest

from models.bundle import load_bundle
from service.main import create_app
from service.runtime import CPU, RuntimeUnavailable, create_runner
from tests.service.conftest import REPO, SAMPLES, Harness, make_settings

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_runner_reports_the_provider_in_use(bundle_dir):
    runner = create_runner(load_bundle(bundle_dir), "cpu", intra_op_threads=1)
    assert runner.provider == CPU


@pytest.mark.skipif(HAS_CUDA, reason="this ONNX Runtime has the CUDA provider")
def test_cuda_requested_without_cuda_refuses_to_start_or_warns(bundle_dir):
    bundle = load_bundle(bundle_dir)
    with pytest.raises(RuntimeUnavailable, match="AEGIS_ON_MISSING_CUDA=warn"):
        create_runner(bundle, "cuda", on_missing_cuda="fail")
    assert create_runner(bundle, "cuda", on_missing_cuda="warn").provider == CPU
    with pytest.raises(RuntimeUnavailable):
        with Harness(create_app(make_settings(bundle_dir, device="cuda"))):
            pass
    with Harness(create_app(make_settings(bundle_dir, device="cuda", on_missing_cuda="warn"))) as harness:
        assert harness.get("/readyz").status_code == 200
        assert harness.state.provider == CPU


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU")
def test_cuda_provider_is_really_used(bundle_dir):
    assert create_runner(load_bundle(bundle_dir), "cuda").provider == "CUDAExecutionProvider"


def test_service_runs_without_torch_and_without_training(bundle_dir):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        sys.modules["training"] = None
        import asyncio, httpx
        from service.config import Settings
        from service.main import create_app
        app = create_app(Settings(bundle_dir={str(bundle_dir)!r}, auth_disabled=True, intra_op_threads=1))

        async def main():
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    data = open({str(SAMPLES[0])!r}, "rb").read()
                    r = await client.post("/diagnose", content=data, headers={{"content-type": "image/png"}})
                    assert r.status_code == 200, r.text
                    print("DIAGNOSIS", r.json()["diagnosis"])

        asyncio.run(main())
        loaded = sorted(m for m, mod in sys.modules.items()
                        if mod is not None and m.split(".")[0] in ("torch", "torchvision", "training"))
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DIAGNOSIS" in result.stdout


def test_service_package_never_imports_torch_or_training_in_source():
    import ast

    for path in (REPO / "service").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("torch", "torchvision", "training"), (path, name)
                assert name != "models.networks", (path, name)
