"""Where the service's CPU goes under load: py-spy samples of a real `python -m service` process, summed per stage.

    .venv/bin/python -m benchmarks.profile_service --seconds 20 --concurrency 32 --server-cpus 0

The server runs as in production (INFO access log, decision record on, h11 unless `--http httptools`), driven by
the benchmark's client (benchmarks/service.py) with raw PNG bodies; `py-spy record` (from PyPI, the `bench` extra)
samples every thread of the server for the measured seconds. Each sample is charged to the stage of the innermost
frame that names one (table `STAGES`: the project's own modules first, then the libraries that only one stage uses),
and the table says how many milliseconds of CPU per answered request each stage costs. A raw collapsed-stack file
(`--out`, flamegraph.pl / speedscope input) is kept for a flame graph.

The milliseconds per stage are the server's CPU seconds per answered request (Linux /proc, exact) split in the
proportions of py-spy's samples (idle threads left out). This is CPU time, not latency: time spent waiting (the batch queue, a request waiting for the event loop) is in the
per-stage latency histogram `aegis_stage_duration_seconds` instead, which the table prints next to it (p50 per stage
from the server's /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from benchmarks.service import DEFAULT_IMAGES, _load, _process_cpu_seconds, parse_cpus, start_server

# (stage, pattern on a frame "function (file:line)"); the innermost frame that matches any pattern decides, in
# this order of preference only among patterns matching the same frame
STAGES: list[tuple[str, str]] = [
    ("inference", r"service/runtime\.py|onnxruntime"),
    ("cushion", r"models/cushion\.py"),
    ("resize (prepare_image)", r"models/imaging\.py"),
    ("decode (PNG/JPEG/DICOM)", r"service/decode\.py|pydicom"),
    ("decision record", r"service/record/|sqlalchemy|sqlite3"),
    ("logging", r"structlog|logging/__init__|service/logs\.py"),
    ("metrics", r"prometheus_client|service/metrics\.py"),
    ("multipart", r"formparsers\.py|python_multipart|multipart/"),
    ("HTTP parse + write (h11/httptools)", r"h11/|h11_impl\.py|httptools_impl\.py|httptools"),
    ("response (validation, JSON)", r"fastapi/routing\.py:\d+\)$|serialize_response|jsonable_encoder|"
                                    r"starlette/responses\.py|pydantic|json/encoder"),
    ("service code (admission, batching, routes)", r"service/"),
    ("framework (FastAPI/Starlette routing, deps)", r"fastapi/|starlette/"),
    ("event loop (asyncio/uvloop, sockets)", r"asyncio/|uvloop|selectors\.py|socket\.py|concurrent/futures"),
]
_COMPILED = [(stage, re.compile(pattern)) for stage, pattern in STAGES]
IDLE = "idle (a thread waiting for work)"
# py-spy --nonblocking cannot always tell a waiting thread from a running one: a sample whose innermost frame is
# one of these waits is not CPU
_WAITING = re.compile(r"^(_worker \(concurrent/futures/thread\.py|\S*wait \(threading\.py|\S*get \(queue\.py)")


def stage_of(stack: list[str]) -> str:
    """The stage of one sample (frames root first, as py-spy's raw format writes them)."""
    if stack and _WAITING.match(stack[-1]):
        return IDLE
    for frame in reversed(stack):
        for stage, pattern in _COMPILED:
            if pattern.search(frame):
                return stage
    return "other"


def stage_samples(raw: str) -> Counter:
    """py-spy's raw (collapsed) output -> samples per stage. Lines: `thread (id);frame;frame;... count`."""
    counts: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[stage_of(stack.split(";")[1:])] += int(count)
    return counts


def stage_latency_p50(metrics_text: str) -> dict[str, float]:
    """p50 (ms, bucket upper bound) of `aegis_stage_duration_seconds` per stage, from /metrics text."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for m in re.finditer(r'aegis_stage_duration_seconds_bucket\{le="([^"]+)",stage="([^"]+)"\} ([0-9.e+]+)',
                         metrics_text):
        le, stage, value = m.groups()
        buckets.setdefault(stage, []).append((float(le), float(value)))
    p50 = {}
    for stage, rows in buckets.items():
        rows.sort()
        total = rows[-1][1]
        if total:
            p50[stage] = next(le for le, v in rows if v >= total / 2) * 1e3
    return p50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--seconds", type=float, default=20.0, help="profiled seconds of load")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--http", choices=["h11", "httptools"], default=None, help="default: the service's default")
    parser.add_argument("--server-cpus", type=parse_cpus, default=None, metavar="LIST",
                        help="pin the server (e.g. 0) and run the client and py-spy on the other CPUs")
    parser.add_argument("--null-model", action="store_true",
                        help="a model that computes nothing (benchmarks.service.null_runner): only the service's own "
                             "CPU")
    parser.add_argument("--images", nargs="+", default=DEFAULT_IMAGES)
    parser.add_argument("--out", default=None, help="keep py-spy's collapsed stacks here (flame graph input)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    files = sorted({f for pattern in args.images for f in glob.glob(pattern)})[:256]
    images = [Path(f).read_bytes() for f in files]
    threads = str(len(args.server_cpus)) if args.server_cpus else "0"
    record = Path(tempfile.mkdtemp()) / "records.sqlite"
    env = {"AEGIS_AUTH_DISABLED": "true", "AEGIS_INTRA_OP_THREADS": threads, "AEGIS_PREPROCESS_THREADS": threads,
           "AEGIS_RECORD_URL": f"sqlite:///{record}"}
    if args.http:
        env["AEGIS_HTTP"] = args.http
    server = ["-m", "benchmarks.service", "--serve-null-model"] if args.null_model else ["-m", "service"]
    server_args = [*server, *(["--bundle", args.bundle] if args.bundle else [])]
    process, base = start_server(server_args, env, args.server_cpus)
    if args.server_cpus:
        os.sched_setaffinity(0, os.sched_getaffinity(0) - args.server_cpus)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "profile.txt"
    try:
        asyncio.run(_load(base, "/v1/diagnose", images, args.concurrency, 3.0))  # warm-up
        spy = subprocess.Popen([shutil.which("py-spy", path=Path(sys.executable).parent) or "py-spy", "record", "--pid", str(process.pid), "--rate", str(args.rate),
                                "--duration", str(int(args.seconds)), "--format", "raw", "--nonblocking",
                                "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # py-spy attaches
        cpu0 = _process_cpu_seconds(process.pid)
        load = asyncio.run(_load(base, "/v1/diagnose", images, args.concurrency, args.seconds - 0.5, time.time()))
        cpu1 = _process_cpu_seconds(process.pid)
        _, spy_err = spy.communicate(timeout=120)
        metrics_text = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        process.terminate()
        process.wait(60)
    if not out.exists():
        sys.exit(f"py-spy wrote nothing: {spy_err.decode(errors='replace')[-500:]}")
    counts = stage_samples(out.read_text())
    idle = counts.pop(IDLE, 0)
    answered = len(load["latencies"])
    latencies = np.array(load["latencies"]) * 1e3
    p50, p99 = np.percentile(latencies, [50, 99])
    # absolute CPU per request from /proc (py-spy's nonblocking samples overcount a busy process); shares from py-spy
    proc_ms = (cpu1 - cpu0) / answered * 1e3 if None not in (cpu0, cpu1) else sum(counts.values()) / args.rate / answered * 1e3
    total = sum(counts.values())
    per_request_ms = {stage: n / total * proc_ms for stage, n in counts.most_common()}
    figures = {"command": " ".join(["python -m benchmarks.profile_service", *(argv or sys.argv[1:])]),
               "http": args.http or "default", "concurrency": args.concurrency,
               "model": "null (computes nothing)" if args.null_model else "the bundle's graph",
               "requests_per_second": answered / load["seconds"], "p50_ms": p50, "p99_ms": p99,
               "cpu_ms_per_request": per_request_ms, "cpu_ms_per_request_total": sum(per_request_ms.values()),
               "stage_latency_p50_ms": stage_latency_p50(metrics_text), "samples": sum(counts.values()),
               "idle_samples": idle}
    print(f"{answered / load['seconds']:.1f} req/s at c={args.concurrency}, p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
          f"CPU per answered request by stage (py-spy, {figures['samples']} samples):")
    for stage, ms in per_request_ms.items():
        print(f"  {stage:48s} {ms:7.3f} ms  {ms / figures['cpu_ms_per_request_total']:6.1%}")
    print(f"  {'total':48s} {figures['cpu_ms_per_request_total']:7.3f} ms")
    print("latency p50 per stage (ms, /metrics buckets):", json.dumps(figures["stage_latency_p50_ms"]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
