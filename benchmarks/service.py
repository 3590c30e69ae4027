"""Benchmark: raw ONNX Runtime limit, defence cost, service throughput/latency, and a naive endpoint for comparison.

Prints figures; it is not a timed test. Run on the machine whose figures you report, and quote the command:

    .venv/bin/python -m benchmarks.service --bundle models/default --seconds 5
    .venv/bin/python -m benchmarks.service --bundle models/default --device cuda      # with the gpu extra on a GPU

1. raw ORT: images/s of the bundle's graph on pre-Cushioned inputs at batch 1..64; the best is the limit.
2. defence cost: Cushion (per image, one core) and the full graph (classifier + Shields) against the classifier-only
   subgraph (`logits` only, cut with `onnx.utils.extract_model`; needs the `onnx` package, from the train extra).
3. service: `python -m service` in a subprocess, driven by an httpx client at concurrency 1, 8 and 32 (raw PNG bodies);
   throughput and p50/p95/p99 latency. By default the client shares the machine's cores with the server; each row
   says how many cores the server and the client used (Linux /proc). `--server-cpus 0` pins the server (and the raw
   ORT measurement) to CPU 0 and the client to the others, so that the ratio to raw ORT compares like with like.
   `--replicas N` runs N server processes (the way the service scales: one process per container, N containers on one
   host and GPU), the load shared over them by N client processes.
4. naive: the same decode -> prepare -> Cushion -> ORT -> decision done inline per request (batch 1, blocking the event
   loop), the way a first version usually looks; same client, same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request

from models.bundle import Bundle, load_bundle
from models.imaging import prepare_image
from service.__main__ import checked_settings, http_limits
from service.main import create_app

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = [str(REPO / "samples" / "*.png"),
                  str(REPO.parent / "shared" / "data" / "kermany-pneumonia" / "test" / "*" / "*.png")]


def _session(path: Path, device: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    return session


def _throughput(session, outputs: list[str], batch: np.ndarray, seconds: float) -> float:
    session.run(outputs, {"image": batch})
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(outputs, {"image": batch})
        n += len(batch)
    return n / (time.perf_counter() - started)


def _inputs(bundle: Bundle, images: list[bytes], size: int) -> np.ndarray:
    import io

    from PIL import Image

    rows = []
    for i in range(size):
        u = bundle.cushion(prepare_image(Image.open(io.BytesIO(images[i % len(images)])), bundle.manifest.input))
        rows.append(u.transpose(2, 0, 1).astype(np.float32) / 255)
    return np.stack(rows)


def raw_ort(bundle: Bundle, images: list[bytes], device: str, threads: int, seconds: float) -> dict[int, float]:
    session = _session(bundle.onnx_path, device, threads)
    print(f"provider: {session.get_providers()[0]}")
    return {bs: _throughput(session, ["logits", "shield_logits"], _inputs(bundle, images, bs), seconds)
            for bs in (1, 2, 4, 8, 16, 32, 64)}


def defence_cost(bundle: Bundle, images: list[bytes], device: str, threads: int, seconds: float,
                 batch_size: int) -> dict:
    import io

    from PIL import Image

    decoded = [Image.open(io.BytesIO(b)) for b in images]
    for image in decoded:
        image.load()
    prepared = [prepare_image(image, bundle.manifest.input) for image in decoded]
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        bundle.cushion(prepared[n % len(prepared)])
        n += 1
    cushion_seconds = (time.perf_counter() - started) / n
    batch = _inputs(bundle, images, batch_size)
    full_session = _session(bundle.onnx_path, device, threads)
    result = {"cushion_seconds_per_image": cushion_seconds, "batch_size": batch_size}
    try:
        import onnx.utils
    except ImportError:
        result["full_graph_images_per_second"] = _throughput(full_session, ["logits", "shield_logits"], batch, seconds)
        result["classifier_only"] = "n/a (install onnx to cut the classifier-only subgraph)"
        return result
    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "classifier.onnx"
        onnx.utils.extract_model(str(bundle.onnx_path), str(cut), ["image"], ["logits"])
        classifier_session = _session(cut, device, threads)
        # Interleaved rounds in alternating order (ABBA...), the median of the per-round ratios: measured one after
        # the other, warm-up and the host's drift showed up as a 10% "overhead" of a Shield that costs nothing.
        rounds, ratios, full_rates, classifier_rates = 6, [], [], []
        for r in range(rounds):
            pair = [(full_session, ["logits", "shield_logits"], full_rates),
                    (classifier_session, ["logits"], classifier_rates)]
            for session, outputs, rates in (pair if r % 2 == 0 else pair[::-1]):
                rates.append(_throughput(session, outputs, batch, seconds / rounds))
            ratios.append(classifier_rates[-1] / full_rates[-1])
    full, classifier = float(np.median(full_rates)), float(np.median(classifier_rates))
    shield_overhead = float(np.median(ratios)) - 1
    result.update(full_graph_images_per_second=full, classifier_only_images_per_second=classifier,
                  shield_overhead=shield_overhead, rounds=rounds,
                  # per image: (1/full + cushion) / (1/classifier) - 1
                  cushion_plus_shield_overhead=shield_overhead + cushion_seconds * classifier)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], env: dict[str, str], cpus: set[int] | None = None) -> tuple[subprocess.Popen, str]:
    """`python ARGS --port P` in a subprocess (pinned to `cpus` when given), waited on until /readyz answers 200:
    (process, base url)."""
    import httpx

    port = _free_port()
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    process = subprocess.Popen([sys.executable, *args, "--port", str(port)], cwd=REPO, env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server {args} exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


async def _load(base: str, path: str, images: list[bytes], concurrency: int, seconds: float,
                start_at: float | None = None, per_client: int = 4) -> dict:
    """`concurrency` closed-loop clients, warmed up until `start_at` (wall clock, so that client processes start
    measuring together; default: 1 s from now), then measured for `seconds`. httpx's pool slows down past ~8
    connections per client, so the workers are spread over one AsyncClient per `per_client` connections (otherwise
    the load generator, not the server, is measured; `per_client=concurrency` is one plain AsyncClient, what an
    integrator writes first). Answers the raw latencies (s), errors and the measured seconds."""
    import httpx

    latencies: list[float] = []
    errors = 0
    n_clients = max(1, -(-concurrency // per_client))
    clients = [httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=per_client))
               for _ in range(n_clients)]

    async def worker(w: int, until: float, record: bool):
        nonlocal errors
        client, i = clients[w % n_clients], w
        while time.time() < until:
            t0 = time.perf_counter()
            r = await client.post(path, content=images[i % len(images)], headers={"content-type": "image/png"})
            if record:
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
            i += concurrency

    started = time.time() + 1.0 if start_at is None else start_at
    try:
        await asyncio.gather(*(worker(w, started, False) for w in range(concurrency)))  # warm-up
        started = time.time()
        await asyncio.gather(*(worker(w, started + seconds, True) for w in range(concurrency)))
        elapsed = time.time() - started
    finally:
        for client in clients:
            await client.aclose()
    return {"latencies": latencies, "errors": errors, "seconds": elapsed}


def _process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its live descendants (all their threads: worker processes
    included), from /proc; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except OSError:
        return None
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_process_cpu_seconds(child) or 0.0 for child in children)


def _client_process(job: tuple) -> dict:
    """One load-generator process (`_load` plus the CPU seconds it used): a single Python client tops out near the
    server's own rate, so loads on several replicas run one client process per replica."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    before = cpu()
    result = asyncio.run(_load(*job))
    result["cpu_seconds"] = cpu() - before
    return result


WRK_SCRIPT = """
local bodies, i = {}, 0
function init(args)
  for _, f in ipairs(args) do local h = io.open(f, "rb"); bodies[#bodies + 1] = h:read("*a"); h:close() end
  i = math.random(#bodies)
end
function request()
  i = i % #bodies + 1
  return wrk.format("POST", PATH, {["Content-Type"] = "image/png"}, bodies[i])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, "p50_us": %d, ' ..
    '"p95_us": %d, "p99_us": %d}\\n', summary.requests, summary.duration, e.status, e.connect + e.read + e.write +
    e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def _wrk_load(base: str, path: str, files: list[str], concurrency: int, seconds: float) -> dict:
    """The same closed loop driven by `wrk` (Debian package, C, one thread): a load generator much lighter than
    Python's, to tell the server's tail from the client's. Latency percentiles come from wrk's own histogram."""
    import resource
    import shutil

    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("--client wrk needs wrk (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(f'PATH = "{path}"\n' + WRK_SCRIPT, encoding="utf-8")
        command = [wrk, "-t1", f"-c{concurrency}", "--timeout", "60s", "-s", str(script), base, "--", *files]
        def run(duration: str) -> str:
            done = subprocess.run([*command[:3], duration, *command[3:]], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stderr or done.stdout)[-500:]}")
            return done.stdout

        run("-d1s")  # warm-up
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = run(f"-d{max(1, round(seconds))}s")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.strip().splitlines()[-1])
    answered = result["requests"] - result["non2xx"]
    return {"answered": answered, "errors": result["non2xx"] + result["socket_errors"],
            "seconds": result["duration_us"] / 1e6,
            "percentiles_ms": [result[k] / 1e3 for k in ("p50_us", "p95_us", "p99_us")],
            "cpu_seconds": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def _measured_load(processes: list[subprocess.Popen], bases: list[str], path: str, images: list[bytes],
                   concurrency: int, seconds: float, client: str = "pooled", files: list[str] | None = None) -> dict:
    """`_load` on every replica at once (the concurrency shared out over them, one client process each when there
    are several), with the cores the server processes and the clients used while it ran (warm-up included).
    `client`: pooled (httpx, one AsyncClient per 4 connections), httpx (one plain AsyncClient with all the
    connections) or wrk."""
    import multiprocessing

    n = len(bases)
    shares = [s for s in (concurrency // n + (i < concurrency % n) for i in range(n)) if s]
    server0, started = [_process_cpu_seconds(p.pid) for p in processes], time.perf_counter()
    if client == "wrk":
        if len(shares) != 1:
            raise SystemExit("--client wrk drives one replica")
        run = _wrk_load(bases[0], path, files or [], shares[0], seconds)
        server_cores = _cores_since(processes, server0, started)
        return _with_cpu_per_request({"concurrency": concurrency, "replicas": 1, "client": client,
                "requests_per_second": run["answered"] / run["seconds"],
                **dict(zip(("p50_ms", "p95_ms", "p99_ms"), run["percentiles_ms"])), "errors": run["errors"],
                "answered_per_replica": [run["answered"]],
                "server_cores": server_cores, "client_cores": run["cpu_seconds"] / (time.perf_counter() - started)})
    per_client = {"pooled": 4, "httpx": concurrency}[client]
    if len(shares) == 1:
        results = [_client_process((bases[0], path, images, shares[0], seconds, None, per_client))]
    else:
        start_at = time.time() + 5.0  # the spawned clients import this module first
        jobs = [(base, path, images, share, seconds, start_at, per_client) for base, share in zip(bases, shares)]
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.map(_client_process, jobs)
    server_cores, elapsed = _cores_since(processes, server0, started), time.perf_counter() - started
    latencies = [t for r in results for t in r["latencies"]]
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    measured = max(r["seconds"] for r in results)
    return _with_cpu_per_request({"concurrency": concurrency, "replicas": len(bases), "client": client,
            "requests_per_second": len(latencies) / measured,
            "p50_ms": q[0] * 1e3, "p95_ms": q[1] * 1e3, "p99_ms": q[2] * 1e3,
            "errors": sum(r["errors"] for r in results), "answered_per_replica": [len(r["latencies"]) for r in results],
            "server_cores": server_cores, "client_cores": sum(r["cpu_seconds"] for r in results) / elapsed})


def _cores_since(processes: list[subprocess.Popen], before: list[float | None], started: float) -> float | None:
    """Cores the server processes used since `started` (their CPU seconds then were `before`); None without /proc."""
    after = [_process_cpu_seconds(p.pid) for p in processes]
    if None in before + after:
        return None
    return (sum(after) - sum(before)) / (time.perf_counter() - started)


def _with_cpu_per_request(row: dict) -> dict:
    """The server's CPU milliseconds per answered request (warm-up included in both, so approximate)."""
    rate, cores = row["requests_per_second"], row["server_cores"]
    row["server_cpu_ms_per_request"] = cores / rate * 1e3 if cores is not None and rate else None
    return row


def naive_app(bundle_dir: str | None):
    """Everything inline per request, batch 1, blocking the event loop: the comparison point."""
    import io

    from PIL import Image

    bundle = load_bundle(bundle_dir)
    session = _session(bundle.onnx_path, os.environ.get("AEGIS_DEVICE", "cpu"),
                       int(os.environ.get("AEGIS_INTRA_OP_THREADS", "0")))
    m = bundle.manifest
    app = FastAPI()

    @app.get("/readyz")
    async def ready():
        return {"status": "ready"}

    @app.post("/naive")
    async def naive(request: Request):
        image = Image.open(io.BytesIO(await request.body()))
        u = bundle.cushion(prepare_image(image, m.input))
        logits, shield = session.run(["logits", "shield_logits"],
                                     {"image": u.transpose(2, 0, 1)[None].astype(np.float32) / 255})
        k = int(np.argmax(logits[0]))
        return {"diagnosis": m.classes[k],
                "decision": "accept" if shield[0, k] >= m.thresholds[m.classes[k]] else "reject"}

    return app


def null_runner(bundle: Bundle, settings) -> callable:
    """A batch callable with the graph's output shapes that computes nothing (zeros: every answer is the first class,
    accepted at a threshold <= 0): the service's own CPU per request, without the model's."""
    classes = len(bundle.manifest.classes)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((len(batch), classes), np.float32), np.zeros((len(batch), classes), np.float32)

    return run


def serve_null_model(bundle_dir: str | None, port: int) -> None:
    """`python -m service` as configured by the environment (same HTTP protocol and limits), with `null_runner`."""
    import uvicorn

    settings = checked_settings({"bundle_dir": bundle_dir} if bundle_dir else {})
    app = create_app(settings, runner_factory=null_runner)
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False, server_header=False,
                **http_limits(settings))


def parse_cpus(text: str) -> set[int]:
    """"0", "0,2" or "0-3" -> a CPU set."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the embedded default bundle)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = all cores)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-wait-seconds", type=float, default=0.002)
    parser.add_argument("--images", nargs="+", default=DEFAULT_IMAGES, help="PNG globs (first 256 files)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--skip-http", action="store_true", help="only the in-process ORT and defence figures")
    parser.add_argument("--service-only", action="store_true",
                        help="only the service's HTTP figures (no raw ORT, defence cost or naive endpoint): for "
                             "quick A/B runs of a service setting, e.g. AEGIS_RECORD_ENABLED=false vs a record URL")
    parser.add_argument("--server-cpus", type=parse_cpus, default=None, metavar="LIST",
                        help="e.g. 0 or 0-3: the server (and the raw ORT limit) run on these CPUs, the load "
                             "generator on the others, so that the client's CPU is not charged to the server")
    parser.add_argument("--replicas", type=int, default=1,
                        help="server processes per endpoint (like replicas of one container each, sharing the "
                             "machine and its GPU), each driven by its own client process")
    parser.add_argument("--client", choices=["pooled", "httpx", "wrk"], default="pooled",
                        help="load generator: pooled = httpx, one AsyncClient per 4 connections (default); httpx = "
                             "one plain AsyncClient with every connection (what an integrator writes first); wrk = "
                             "Debian's wrk, a C load generator (apt-get install wrk)")
    parser.add_argument("--http", choices=["h11", "httptools"], default=None,
                        help="the service's HTTP protocol (AEGIS_HTTP; default: the service's default)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes behind one port (python -m service --workers N), each with "
                             "cores / N intra-op and decode threads")
    parser.add_argument("--log-level", default="INFO",
                        help="the service's log level (INFO, the default, writes one access line per request)")
    parser.add_argument("--null-model", action="store_true",
                        help="serve with a model that computes nothing (benchmarks.service.null_runner): the rows' "
                             "server_cpu_ms_per_request is then the service's CPU per request outside the model")
    parser.add_argument("--serve-naive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-null-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve_null_model:
        serve_null_model(args.bundle, args.port)
        return 0
    if args.serve_naive:
        import uvicorn

        uvicorn.run(naive_app(args.bundle), host="127.0.0.1", port=args.port, log_level="warning")
        return 0

    files = sorted({f for pattern in args.images for f in glob.glob(pattern)})[:256]
    if not files:
        parser.error(f"no images match {args.images}")
    images = [Path(f).read_bytes() for f in files]
    bundle = load_bundle(args.bundle)
    client_cpus = None
    if args.server_cpus:
        client_cpus = os.sched_getaffinity(0) - args.server_cpus
        if not client_cpus or not args.server_cpus <= os.sched_getaffinity(0):
            parser.error(f"--server-cpus {sorted(args.server_cpus)} must be a proper subset of the CPUs "
                         f"{sorted(os.sched_getaffinity(0))}")
        os.sched_setaffinity(0, args.server_cpus)  # the raw ORT limit is measured on the server's CPUs
        args.threads = args.threads or len(args.server_cpus)
    figures: dict = {"bundle": f"{bundle.manifest.name} {bundle.manifest.version}", "images": len(images),
                     "input": bundle.manifest.input.model_dump(), "cpu_count": os.cpu_count(),
                     "machine": platform.platform(), "command": " ".join(["python -m benchmarks.service", *sys.argv[1:]]),
                     "server_cpus": sorted(args.server_cpus) if args.server_cpus else "all", "replicas": args.replicas,
                     "client": args.client, "http": args.http or "default", "workers": args.workers,
                     "model": "null (computes nothing)" if args.null_model else "the bundle's graph",
                     "client_cpus": sorted(client_cpus) if client_cpus else "all (shared with the server)"}
    print(json.dumps({k: figures[k] for k in ("bundle", "input", "images", "cpu_count", "server_cpus", "client_cpus",
                                              "replicas")}))

    if not args.service_only:
        raw = raw_ort(bundle, images, args.device, args.threads, args.seconds)
        best = max(raw, key=raw.get)
        figures["raw_ort_images_per_second"] = raw
        figures["raw_ort_best"] = {"batch_size": best, "images_per_second": raw[best]}
        for bs, rate in raw.items():
            print(f"raw ORT batch {bs:3d}: {rate:10.1f} images/s" + ("   <- limit" if bs == best else ""))
        cost = defence_cost(bundle, images, args.device, args.threads, args.seconds, best)
        figures["defence_cost"] = cost
        print("defence cost:", json.dumps(cost))

    if not args.skip_http:
        env = {"AEGIS_AUTH_DISABLED": "true", "AEGIS_LOG_LEVEL": args.log_level, "AEGIS_DEVICE": args.device,
               "AEGIS_INTRA_OP_THREADS": str(args.threads), "AEGIS_MAX_BATCH_SIZE": str(args.max_batch_size),
               "AEGIS_MAX_BATCH_WAIT_SECONDS": str(args.max_batch_wait_seconds),
               "AEGIS_PREPROCESS_THREADS": str(len(args.server_cpus) if args.server_cpus else 0)}
        if args.http:
            env["AEGIS_HTTP"] = args.http
        if args.workers > 1:  # N processes on one port; threads per worker so that workers x threads <= cores
            cores = len(args.server_cpus) if args.server_cpus else os.cpu_count() or 1
            per_worker = str(max(1, cores // args.workers))
            env.update(AEGIS_WORKERS=str(args.workers), AEGIS_INTRA_OP_THREADS=per_worker,
                       AEGIS_PREPROCESS_THREADS=per_worker)
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        bundle_args = ["--bundle", str(bundle.root)]
        service_command = ["-m", "benchmarks.service", "--serve-null-model"] if args.null_model else ["-m", "service"]
        endpoints = (("service", [*service_command, *bundle_args], "/v1/diagnose"),
                     ("naive", ["-m", "benchmarks.service", "--serve-naive", *bundle_args], "/naive"))
        for name, cmd, path in endpoints[:1] if args.service_only else endpoints:
            servers = []
            try:
                for _ in range(args.replicas):
                    servers.append(start_server(cmd, env, args.server_cpus))
                processes, bases = [s[0] for s in servers], [s[1] for s in servers]
                figures[f"{name}_process_cpus"] = sorted(os.sched_getaffinity(processes[0].pid))
                rows = [_measured_load(processes, bases, path, images, c, args.seconds, args.client, files)
                        for c in args.concurrency]
            finally:
                for process, _ in servers:
                    process.terminate()
                for process, _ in servers:
                    process.wait(60)
            figures[name] = rows
            for row in rows:
                print(f"{name:8s} c={row['concurrency']:3d} x{row['replicas']}: {row['requests_per_second']:8.1f} req/s  "
                      f"p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                      f"errors {row['errors']}  cores: server {row['server_cores'] or float('nan'):.2f} "
                      f"client {row['client_cores']:.2f}  server CPU/request "
                      f"{row['server_cpu_ms_per_request'] or float('nan'):.2f} ms")
    if not args.skip_http and not args.service_only:
        top = {row["concurrency"]: row["requests_per_second"] for row in figures["service"]}
        naive = {row["concurrency"]: row["requests_per_second"] for row in figures["naive"]}
        c = max(top)
        figures["summary"] = {
            f"service_vs_raw_ort_at_c{c}": top[c] / raw[best],
            f"service_vs_naive_at_c{c}": top[c] / naive[c] if naive.get(c) else None,
        }
        print("summary:", json.dumps(figures["summary"]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=float) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
