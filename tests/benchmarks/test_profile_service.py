"""The profiling benchmark charges each py-spy sample to the right stage, and runs against a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.profile_service import IDLE, main, stage_latency_p50, stage_of, stage_samples
from tests.service.conftest import SAMPLES

PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def test_the_innermost_frame_that_names_a_stage_decides():
    root = ["_run_module_as_main (<frozen runpy>:198)", "run (uvicorn/server.py:60)"]
    decode = [*root, "run (concurrent/futures/thread.py:58)", "_decode_and_prepare (service/diagnosis.py:34)",
              "decode_image (service/decode.py:101)", "load (PIL/ImageFile.py:290)"]
    cushion = [*root, "_decode_and_prepare (service/diagnosis.py:36)", "preprocess (service/pipeline.py:70)",
               "__call__ (models/cushion.py:43)", "save (PIL/Image.py:2500)"]
    logging = [*root, "__call__ (service/middleware.py:88)", "meth (structlog/_native.py:134)",
               "dumps (json/__init__.py:238)"]
    parse = [*root, "data_received (service/http.py:60)", "data_received (uvicorn/protocols/http/h11_impl.py:200)",
             "next_event (h11/_connection.py:470)"]
    assert stage_of(decode) == "decode (PNG/JPEG/DICOM)"  # PIL under service/decode.py
    assert stage_of(cushion) == "cushion"  # PIL under models/cushion.py, though the pipeline called it
    assert stage_of(logging) == "logging"  # json under structlog: logging, not the response
    assert stage_of(parse) == "HTTP parse + write (h11/httptools)"
    assert stage_of(root) == "other"  # no frame names a stage
    waiting = [*root, "_worker (concurrent/futures/thread.py:90)"]
    assert stage_of(waiting) == IDLE  # a pool thread waiting for work is not CPU
    assert stage_of([*root, "_run (service/record/writer.py:140)", "Queue.get (queue.py:180)",
                     "Condition.wait (threading.py:331)"]) == IDLE
    raw = "\n".join(f"thread (1);{';'.join(stack)} {n}" for stack, n in ((decode, 3), (cushion, 2), (decode, 1)))
    assert stage_samples(raw) == {"decode (PNG/JPEG/DICOM)": 4, "cushion": 2}


def test_stage_latency_p50_reads_the_histogram_buckets():
    text = "\n".join([
        'aegis_stage_duration_seconds_bucket{le="0.001",stage="decode"} 10.0',
        'aegis_stage_duration_seconds_bucket{le="0.0025",stage="decode"} 90.0',
        'aegis_stage_duration_seconds_bucket{le="+Inf",stage="decode"} 100.0',
        'aegis_stage_duration_seconds_bucket{le="0.01",stage="queue"} 0.0',
        'aegis_stage_duration_seconds_bucket{le="0.05",stage="queue"} 60.0',
        'aegis_stage_duration_seconds_bucket{le="+Inf",stage="queue"} 100.0',
    ])
    assert stage_latency_p50(text) == pytest.approx({"decode": 2.5, "queue": 50.0})


def _can_attach() -> bool:
    """py-spy needs ptrace rights on the server (a container may drop CAP_SYS_PTRACE)."""
    if PY_SPY is None:
        return False
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        return subprocess.run([PY_SPY, "dump", "--pid", str(child.pid)], capture_output=True).returncode == 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not _can_attach(), reason="py-spy cannot attach to a process here (ptrace not permitted)")
def test_a_real_profile_charges_the_service_stages(tiny_bundle_dir, tmp_path):
    out = tmp_path / "profile.json"
    assert main(["--bundle", str(tiny_bundle_dir), "--seconds", "3", "--concurrency", "4", "--rate", "200",
                 "--images", str(SAMPLES[0].parent / "*.png"), "--out", str(tmp_path / "stacks.txt"),
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    stages = figures["cpu_ms_per_request"]
    assert {"decode (PNG/JPEG/DICOM)", "cushion", "inference"} <= set(stages)
    assert figures["cpu_ms_per_request_total"] == pytest.approx(sum(stages.values()))
    assert figures["requests_per_second"] > 0 and figures["samples"] > 0
    assert {"decode", "cushion", "queue", "inference"} <= set(figures["stage_latency_p50_ms"])
    assert (tmp_path / "stacks.txt").stat().st_size > 0
