"""`python -m service.soak`: a soak and fault test of a real `python -m service` on 127.0.0.1, bounded in time and
requests, that exits non-zero on any violation.

    python -m service.soak --seconds 45                                 # the short run (CI: tests/service/test_soak.py)
    python -m service.soak --seconds 900 --restarts 3 --json soak.json  # the long run (docs/benchmark.md)

Mixed load: real X-rays as PNG, JPEG and DICOM (raw bodies and multipart), bad inputs (text, truncated, garbage,
empty, wrong API key, multipart without a file), steady clients plus bursts far over the queue's capacity; the server
is restarted (SIGTERM under load, then started again) `--restarts` times and finally sent SIGTERM under load.

Each logical request carries its own X-Request-ID. A request that meets no server (connection refused or closed
without an answer, i.e. during a restart) is sent again, with the same id, until the server is back. Checked:

- every request got exactly one answer: one HTTP status in the end, and the decision record (written by the server)
  holds exactly one row for each 200 and none for any other request (a row without a 200 is an answer lost after
  the work was done; two rows, work done twice). After the final SIGTERM, requests that find the port closed are
  counted as refused, and must have no row either;
- every 200 equals the offline reference (`models.reference`, batch 1, no service code) for that image: diagnosis,
  decision, threshold, and Shield logit within 1e-4 (micro-batches of different sizes change float sums slightly);
- bad inputs get their 4xx (or a 503), never a 200 or another 5xx; no 5xx but 503, every 503 for overload or
  timeout carries Retry-After; at least one burst went over capacity (else the run proved nothing about overload);
- every SIGTERM ends the server with exit status 0; RSS (resident memory of the server and its workers) right after
  start-up and before each SIGTERM is reported, and a growth above --max-rss-growth-mb in one server lifetime is a
  violation.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import io
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from models.reference import OfflineReference
from service.record.store import DecisionFilter, create_record_engine, iter_decisions

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = [str(REPO / "samples" / "*.png"),
                  str(REPO.parent / "shared" / "data" / "kermany-pneumonia" / "test" / "*" / "*.png")]
SHIELD_TOLERANCE = 1e-4
HOST = "127.0.0.1"  # loopback only: the soak never sends to another host


# --- what is sent -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One kind of request: its body, and either the reference answer (an image) or the 4xx it must get."""

    name: str
    content: bytes | None = None
    content_type: str | None = None
    multipart_field: str | None = None  # send `content` as this multipart field instead of the raw body
    wrong_key: bool = False
    reference: dict | None = None
    refusal: frozenset[int] = frozenset()


def dicom_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit MONOCHROME2 DICOM Part 10 file of `pixels` (H x W uint8), without patient data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _essentials(answer: dict) -> dict:
    return {k: answer[k] for k in ("diagnosis", "decision", "shield_logit", "threshold")}


def build_cases(paths: list[Path], reference: OfflineReference) -> tuple[list[Case], list[Case]]:
    """(image cases with their reference answers, bad-input cases with the statuses they must get)."""
    images = []
    for path in paths:
        png = path.read_bytes()
        gray = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
        jpeg = io.BytesIO()
        Image.fromarray(gray).save(jpeg, format="JPEG", quality=90)
        jpeg = jpeg.getvalue()
        from_png = _essentials(reference.answer(Image.open(io.BytesIO(png))))
        images += [
            Case("png", png, "image/png", reference=from_png),
            Case("multipart_png", png, "image/png", multipart_field="file", reference=from_png),
            Case("jpeg", jpeg, "image/jpeg", reference=_essentials(reference.answer(Image.open(io.BytesIO(jpeg))))),
            Case("dicom", dicom_bytes(gray), "application/dicom",
                 reference=_essentials(reference.answer(Image.fromarray(gray)))),
        ]
    png = paths[0].read_bytes()
    bad = [
        Case("text", b"plain text, not an image", "text/plain", refusal=frozenset({415})),
        Case("truncated_png", png[: len(png) // 3], "image/png", refusal=frozenset({422})),
        Case("garbage", os.urandom(2048), "image/png", refusal=frozenset({415, 422})),
        Case("empty", b"", "image/png", refusal=frozenset({422})),
        Case("truncated_dicom", images[3].content[:400], "application/dicom", refusal=frozenset({415, 422})),
        Case("multipart_without_file", png, "image/png", multipart_field="other", refusal=frozenset({422})),
        Case("wrong_api_key", png, "image/png", wrong_key=True, refusal=frozenset({401})),
    ]
    return images, bad


# --- the server -------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m service` as a child process on 127.0.0.1 (the same port across restarts), output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, port: int | None = None):
        self.args, self.env, self.log_path = args, env, log_path
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "service", "--host", HOST, "--port",
                                             str(self.port), *self.args], cwd=REPO, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode} at start-up "
                                   f"(log: {self.log_path})")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s (log: {self.log_path})")

    def rss_bytes(self) -> int:
        """Resident memory of the server process and its children (the workers)."""
        try:
            root = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 120.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def server_environment(record_url: str, api_key: str, **settings) -> dict[str, str]:
    """The process environment without any AEGIS_* of the caller, plus these settings as AEGIS_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEGIS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    # every soak client is 127.0.0.1 and the bad inputs include bad keys: failed-login throttling (per address) would
    # turn the rest of the run into 429s, so it is lifted here (tests/service/test_hardening.py covers it)
    env.update(PYTHONUNBUFFERED="1", AEGIS_API_KEYS=api_key, AEGIS_RECORD_URL=record_url,
               AEGIS_AUTH_FAILURE_LIMIT="1000000")
    env.update({f"AEGIS_{k.upper()}": str(v) for k, v in settings.items()})
    return env


# --- the load ---------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    request_id: str
    case: str
    status: int | None = None  # the one HTTP answer; None: refused after the final SIGTERM
    attempts: int = 0
    reason: str | None = None
    problem: str | None = None  # a violation, in words
    answer: dict | None = None


@dataclass
class Lifetime:
    """One server process from start to SIGTERM."""

    rss_start_mb: float
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0  # the largest of the samples taken at every burst
    exit_status: int | None = None
    drain_seconds: float = 0.0


@dataclass
class Summary:
    seconds: float = 0.0
    requests: int = 0
    answered: int = 0
    refused_after_final_sigterm: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    by_case: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons_503: dict[str, int] = field(default_factory=dict)
    resent: int = 0
    checked_200: int = 0
    mismatches: int = 0
    lost: int = 0
    duplicated: int = 0
    record_rows: int = 0
    lifetimes: list[dict] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, server: ServerProcess, images: list[Case], bad: list[Case], api_key: str, *, seconds: float,
                 max_requests: int, concurrency: int, burst: int, burst_every: float, bad_fraction: float,
                 restarts: int, seed: int, resend_seconds: float = 120.0):
        self.server, self.images, self.bad, self.api_key = server, images, bad, api_key
        self.seconds, self.max_requests, self.concurrency = seconds, max_requests, concurrency
        self.burst, self.burst_every, self.bad_fraction, self.restarts = burst, burst_every, bad_fraction, restarts
        self.resend_seconds = resend_seconds
        self.random = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.lifetimes: list[Lifetime] = []
        self.final = False  # the final SIGTERM was sent: the server will not come back
        self.stopping = False

    def pick(self) -> Case:
        pool = self.bad if self.random.random() < self.bad_fraction else self.images
        return self.random.choice(pool)

    async def send(self, client: httpx.AsyncClient, case: Case) -> Outcome:
        outcome = Outcome(f"soak-{len(self.outcomes):07d}", case.name)
        self.outcomes.append(outcome)
        headers = {"x-request-id": outcome.request_id, "x-api-key": "wrong" if case.wrong_key else self.api_key}
        if case.multipart_field:
            kwargs = {"files": {case.multipart_field: ("image", case.content, case.content_type)}}
        else:
            kwargs = {"content": case.content, "headers": {"content-type": case.content_type}}
        headers.update(kwargs.pop("headers", {}))
        deadline = time.monotonic() + self.resend_seconds
        while True:
            outcome.attempts += 1
            try:
                response = await client.post(f"{self.server.url}/v1/diagnose", headers=headers, **kwargs)
                break
            except httpx.TransportError:  # no server on the port (restarting), or closed without an answer
                if self.final:
                    return outcome  # refused after the final SIGTERM: status None
                if time.monotonic() > deadline:
                    outcome.problem = f"no answer within {self.resend_seconds:.0f} s of resending"
                    return outcome
                await asyncio.sleep(0.1)
        outcome.status = response.status_code
        self.check(outcome, case, response)
        return outcome

    def check(self, outcome: Outcome, case: Case, response: httpx.Response) -> None:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            outcome.problem = f"status {status} with a body that is not JSON"
            return
        outcome.reason = body.get("reason")
        if body.get("request_id") != outcome.request_id:
            outcome.problem = f"answer carries request id {body.get('request_id')!r}"
        elif status == 503:
            if outcome.reason in ("overloaded", "timeout") and "retry-after" not in response.headers:
                outcome.problem = f"503 {outcome.reason} without Retry-After"
        elif status >= 500:
            outcome.problem = f"status {status} ({outcome.reason})"
        elif case.reference is None:
            if status not in case.refusal:
                outcome.problem = f"bad input {case.name} got {status}, expected {sorted(case.refusal)}"
        elif status != 200:
            outcome.problem = f"image {case.name} got {status} ({outcome.reason})"
        else:
            outcome.answer = {k: body[k] for k in case.reference}
            expected = case.reference
            if (body["diagnosis"], body["decision"], body["threshold"]) != \
                    (expected["diagnosis"], expected["decision"], expected["threshold"]) or \
                    abs(body["shield_logit"] - expected["shield_logit"]) > SHIELD_TOLERANCE:
                outcome.problem = f"mismatch: got {outcome.answer}, offline reference {expected}"

    def budget_left(self, started: float) -> bool:
        return time.monotonic() - started < self.seconds and len(self.outcomes) < self.max_requests

    async def steady(self, client: httpx.AsyncClient, started: float) -> None:
        while not self.stopping and (self.final or self.budget_left(started)):
            if (await self.send(client, self.pick())).status is None:
                return  # the server is gone for good

    async def fire_burst(self, client: httpx.AsyncClient) -> list[asyncio.Task]:
        return [asyncio.create_task(self.send(client, self.random.choice(self.images))) for _ in range(self.burst)]

    async def sigterm(self, client: httpx.AsyncClient) -> list[asyncio.Task]:
        """SIGTERM while a burst is in flight, then wait for the server to exit; the burst's tasks (those sent after
        the listener closed wait for the next server)."""
        lifetime = self.lifetimes[-1]
        lifetime.rss_end_mb = self.server.rss_bytes() / 2**20
        burst = await self.fire_burst(client)
        await asyncio.sleep(0.05)
        sent = time.monotonic()
        self.server.signal(signal.SIGTERM)
        lifetime.exit_status = await asyncio.to_thread(self.server.wait)
        lifetime.drain_seconds = time.monotonic() - sent
        return burst

    def started(self) -> None:
        self.lifetimes.append(Lifetime(rss_start_mb=self.server.rss_bytes() / 2**20))

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency + 2 * self.burst)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            self.started()
            started = time.monotonic()
            steady = [asyncio.create_task(self.steady(client, started)) for _ in range(self.concurrency)]
            bursts: list[asyncio.Task] = []
            restart_at = [started + self.seconds * (i + 1) / (self.restarts + 1) for i in range(self.restarts)]
            next_burst = started + self.burst_every / 2
            while self.budget_left(started):
                await asyncio.sleep(0.05)
                now = time.monotonic()
                if now >= next_burst:
                    lifetime = self.lifetimes[-1]
                    lifetime.rss_peak_mb = max(lifetime.rss_peak_mb, self.server.rss_bytes() / 2**20)
                    bursts += await self.fire_burst(client)
                    next_burst = now + self.burst_every
                if restart_at and now >= restart_at[0]:
                    restart_at.pop(0)
                    bursts += await self.sigterm(client)
                    await asyncio.to_thread(self.server.start)
                    self.started()
            self.final = True  # steady clients keep sending through the final SIGTERM
            bursts += await self.sigterm(client)
            self.stopping = True
            await asyncio.gather(*steady, *bursts)

    def summarize(self, rows: Counter, seconds: float) -> Summary:
        """The figures and violations, given the decision record's rows per request id."""
        s = Summary(seconds=round(seconds, 1), requests=len(self.outcomes))
        s.record_rows = sum(rows.values())
        statuses, by_case, reasons = Counter(), {}, Counter()
        sent_ids = set()
        for o in self.outcomes:
            sent_ids.add(o.request_id)
            key = str(o.status) if o.status is not None else "refused"
            statuses[key] += 1
            by_case.setdefault(o.case, Counter())[key] += 1
            s.resent += o.attempts - 1
            if o.status == 503:
                reasons[o.reason or "?"] += 1
            n = rows.get(o.request_id, 0)
            if o.status == 200:
                s.checked_200 += 1
                if n != 1:
                    s.duplicated += n > 1
                    s.lost += n == 0
                    o.problem = o.problem or f"answered 200 but recorded {n} times"
            elif n:
                s.lost += 1  # the work was done (recorded) but the client never got its 200
                o.problem = o.problem or f"status {o.status} but recorded {n} times"
            if o.problem and o.problem.startswith("mismatch"):
                s.mismatches += 1
            if o.problem:
                s.violations.append(f"{o.request_id} ({o.case}): {o.problem}")
        unknown = set(rows) - sent_ids
        if unknown:
            s.violations.append(f"{len(unknown)} recorded request ids were never sent, e.g. {sorted(unknown)[:3]}")
        s.answered = sum(v for k, v in statuses.items() if k != "refused")
        s.refused_after_final_sigterm = statuses.get("refused", 0)
        s.statuses = dict(sorted(statuses.items()))
        s.by_case = {case: dict(sorted(c.items())) for case, c in sorted(by_case.items())}
        s.reasons_503 = dict(reasons)
        if not reasons.get("overloaded"):
            s.violations.append("no request was refused for overload: the bursts never went over capacity "
                                "(raise --burst or lower --max-queue)")
        s.lifetimes = [{k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(t).items()}
                       for t in self.lifetimes]
        return s


def recorded_rows(record_url: str) -> Counter:
    """How many rows the decision record holds per request id."""
    engine = create_record_engine(record_url)
    try:
        return Counter(row["request_id"] for row in iter_decisions(engine, DecisionFilter()))
    finally:
        engine.dispose()


def check_lifetimes(summary: Summary, max_growth_mb: float) -> None:
    for i, t in enumerate(summary.lifetimes):
        if t["exit_status"] != 0:
            summary.violations.append(f"server lifetime {i}: exit status {t['exit_status']} after SIGTERM")
        if t["rss_end_mb"] - t["rss_start_mb"] > max_growth_mb:
            summary.violations.append(f"server lifetime {i}: RSS grew from {t['rss_start_mb']} to "
                                      f"{t['rss_end_mb']} MiB (more than {max_growth_mb} MiB)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.soak", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the load (server starts excluded)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop sending new requests after this")
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the embedded bundle)")
    parser.add_argument("--images", nargs="+", default=DEFAULT_IMAGES, help="PNG files or glob patterns")
    parser.add_argument("--max-images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="server processes (python -m service --workers)")
    parser.add_argument("--concurrency", type=int, default=4, help="steady clients")
    parser.add_argument("--burst", type=int, default=64, help="requests sent at once by each burst")
    parser.add_argument("--burst-every", type=float, default=5.0, help="seconds between bursts")
    parser.add_argument("--bad-fraction", type=float, default=0.15, help="share of bad inputs in the steady load")
    parser.add_argument("--restarts", type=int, default=1, help="SIGTERM + start again during the run")
    parser.add_argument("--max-queue", type=int, default=8, help="the server's AEGIS_MAX_QUEUE (small: bursts overflow)")
    parser.add_argument("--drain-seconds", type=float, default=0.5, help="the server's AEGIS_DRAIN_SECONDS")
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--max-rss-growth-mb", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the summary here too")
    parser.add_argument("--keep", action="store_true", help="keep the server log and record (kept on violations)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    paths = sorted({Path(p) for pattern in args.images for p in glob.glob(pattern)})
    paths = random.Random(args.seed).sample(paths, min(len(paths), args.max_images)) if paths else []
    if not paths:
        print(f"no images found in {args.images}", file=sys.stderr)
        return 2
    reference = OfflineReference(args.bundle)
    images, bad = build_cases(paths, reference)
    work = Path(tempfile.mkdtemp(prefix="aegis-soak-"))
    record_url = f"sqlite:///{work}/records.sqlite"
    api_key = secrets.token_urlsafe(24)
    env = server_environment(record_url, api_key, max_queue=args.max_queue, drain_seconds=args.drain_seconds,
                             intra_op_threads=args.intra_op_threads, workers=args.workers, max_batch_size=8,
                             request_timeout_seconds=20)
    server = ServerProcess([] if args.bundle is None else ["--bundle", args.bundle], env, work / "server.log")
    soak = Soak(server, images, bad, api_key, seconds=args.seconds, max_requests=args.max_requests,
                concurrency=args.concurrency, burst=args.burst, burst_every=args.burst_every,
                bad_fraction=args.bad_fraction, restarts=args.restarts, seed=args.seed)
    print(f"soak: {len(paths)} images x {{png, jpeg, dicom, multipart}} + {len(bad)} bad inputs, {args.seconds:.0f} s, "
          f"{args.workers} worker(s), {args.restarts} restart(s), bursts of {args.burst} every {args.burst_every} s, "
          f"server {server.url}, work folder {work}", flush=True)
    started = time.monotonic()
    try:
        server.start()
        asyncio.run(soak.run())
    finally:
        server.kill()
    summary = soak.summarize(recorded_rows(record_url), time.monotonic() - started)
    check_lifetimes(summary, args.max_rss_growth_mb)
    report = asdict(summary)
    report["violations"] = summary.violations[:50] + ([f"... {len(summary.violations) - 50} more"]
                                                       if len(summary.violations) > 50 else [])
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    if summary.violations:
        print(f"FAILED: {len(summary.violations)} violation(s); server log and record in {work}", file=sys.stderr)
        return 1
    print(f"OK: {summary.requests} requests, {summary.answered} answered, {summary.checked_200} answers of 200 equal "
          "the offline reference, 0 lost, 0 duplicated")
    if not args.keep:
        for path in work.iterdir():
            path.unlink()
        work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
