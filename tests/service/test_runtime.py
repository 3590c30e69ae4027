"""ONNX Runtime provider selection, and the torch-free / training-free import contract of the service."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import onnxruntime as ort
import pytest

from models.bundle import load_bundle
from service.main import create_app
import numpy as np

from service.runtime import CPU, RuntimeUnavailable, batch_buckets, create_runner
from tests.service.conftest import REPO, SAMPLES, Harness, make_settings

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_runner_reports_the_provider_in_use(bundle_dir):
    runner = create_runner(load_bundle(bundle_dir), "cpu", intra_op_threads=1)
    assert runner.provider == CPU


def test_batch_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert batch_buckets(1) == (1,)


def test_padded_batches_answer_each_row_as_the_unpadded_session(bundle_dir):
    bundle = load_bundle(bundle_dir)
    plain = create_runner(bundle, "cpu", intra_op_threads=1)
    padded = create_runner(bundle, "cpu", intra_op_threads=1, max_batch_size=8, batch_shapes="buckets")
    assert create_runner(bundle, "cpu", intra_op_threads=1, max_batch_size=8, batch_shapes="max").buckets == (8,)
    assert plain.buckets == () and padded.buckets == (1, 2, 4, 8)
    assert padded.warmup_sizes(8) == [1, 2, 4, 8] and plain.warmup_sizes(8) == [1, 8]
    m = bundle.manifest.input
    x = np.random.default_rng(0).random((5, m.channels, m.height, m.width), dtype=np.float32)
    seen = []
    run = padded.session.run
    padded.session = type("Spy", (), {"run": lambda self, names, feed: seen.append(len(feed["image"])) or run(
        names, feed)})()
    for got, want in zip(padded(x), plain(x)):
        assert got.shape == want.shape == (5, len(bundle.manifest.classes))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert seen == [8]  # 5 rows ran as one batch of 8


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
