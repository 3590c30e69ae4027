"""Prove the CUDA path on a GPU host and measure it: run from the repo root in an environment with the `gpu` extra
(onnxruntime-gpu) and the `train` extra (torch, to export the untrained benchmark bundles):

    python scripts/gpu_check.py --out gpu-check

1. the GPU and ONNX Runtime's providers; 2. a session created the service's way (`service.runtime.create_runner`,
device=cuda, refusing CPU fallback) really runs on CUDAExecutionProvider, and agrees with the CPU session;
3. the real service (`python -m service`, AEGIS_DEVICE=cuda) answers /v1/diagnose and its /metrics report
provider="CUDAExecutionProvider"; 4. `benchmarks.service` on CUDA (raw ORT, defence cost, HTTP service vs naive) and on
CPU (raw ORT) for the default bundle's architecture (ResNet-18, 64 px) and the paper's (ResNet-50, 224 px).
Everything printed is also written to OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except FileNotFoundError:
        return f"{cmd[0]} not found"


def check_runner(bundle_dir: Path, device: str) -> dict:
    from models.bundle import load_bundle
    from service.runtime import create_runner

    bundle = load_bundle(bundle_dir)
    cuda = create_runner(bundle, device, on_missing_cuda="fail")
    cpu = create_runner(bundle, "cpu")
    m = bundle.manifest.input
    x = np.random.default_rng(0).random((8, m.channels, m.height, m.width), dtype=np.float32)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(cuda(x), cpu(x)))
    return {"provider": cuda.provider, "providers": cuda.session.get_providers(), "cuda_vs_cpu_max_abs_diff": diff}


def check_service(bundle_dir: Path, device: str) -> dict:
    import httpx

    from benchmarks.service import start_server

    env = {"AEGIS_AUTH_DISABLED": "true", "AEGIS_DEVICE": device, "AEGIS_LOG_LEVEL": "WARNING"}
    process, base = start_server(["-m", "service", "--bundle", str(bundle_dir)], env)
    try:
        sample = sorted((REPO / "samples").glob("*.png"))[0].read_bytes()
        answer = httpx.post(f"{base}/v1/diagnose", content=sample, headers={"content-type": "image/png"},
                            timeout=60).json()
        info = [line for line in httpx.get(f"{base}/metrics").text.splitlines()
                if line.startswith("aegis_model_info")]
    finally:
        process.terminate()
        process.wait(60)
    return {"diagnose": {k: answer.get(k) for k in ("diagnosis", "decision", "shield_logit", "timings_seconds")}, "model_info": info}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--skip-cpu", action="store_true", help="no CPU raw-ORT baseline")
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script on a machine without GPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    report: dict = {"gpu": sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
                    "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
                    "cpu_count": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(report), flush=True)
    for backbone, size in (("resnet18", 64), ("resnet50", 224)):
        bundle_dir = Path(tempfile.mkdtemp()) / f"benchmark-{backbone}-{size}"  # 50 MB: not an output
        subprocess.run([sys.executable, "-m", "benchmarks.bundle", "--backbone", backbone, "--size", str(size),
                        "--out", str(bundle_dir)], check=True, cwd=REPO)
        row: dict = {"runner": check_runner(bundle_dir, args.device)}
        print(backbone, size, json.dumps(row["runner"]), flush=True)
        row["service"] = check_service(bundle_dir, args.device)
        print(backbone, size, json.dumps(row["service"]), flush=True)
        runs = [(args.device, ["--concurrency", "1", "8", "32", "64"])] + ([] if args.skip_cpu else [("cpu", ["--skip-http"])])
        for device, extra in runs:
            path = args.out / f"bench-{backbone}-{size}-{device}.json"
            subprocess.run([sys.executable, "-m", "benchmarks.service", "--bundle", str(bundle_dir), "--device", device,
                            "--seconds", str(args.seconds), "--json", str(path), *extra], check=True, cwd=REPO)
            row[f"bench_{device}"] = json.loads(path.read_text())
        report[f"{backbone}-{size}"] = row
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
