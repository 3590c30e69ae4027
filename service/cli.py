"""`python -m service.cli`: command-line tools for integrators and auditors (serving side: no torch).

    python -m service.cli diagnose PATH... --url URL --out results.csv     # batch: folders of PNG/JPEG/DICOM
    python -m service.cli export-decisions --format jsonl --out decisions.jsonl   # the decision record, for auditors
    python -m service.cli migrate                                           # upgrade the decision record's schema

`diagnose` walks the folders (PNG, JPEG by extension; DICOM by extension or, for files without one, by the DICM
magic), sends each file as the raw body of POST /v1/diagnose (so the file name never reaches the service), at most
`--concurrency` at a time, retrying 503 answers after their Retry-After and connection errors with backoff, and
writes one row per file (path, HTTP status, diagnosis, probabilities, decision, Shield logit, threshold, request id,
error) to the CSV or JSONL file, then prints a summary (counts, rejection rate per class, images/s). The API key
comes from --api-key-file or the AEGIS_API_KEY environment variable (the key clients of docker compose use).
The paths are written into your output file only.

`export-decisions` reads the decision record straight from its database (--db, default AEGIS_RECORD_URL as the
service uses it) or pages through GET /v1/decisions of a running service (--api URL, with an API key).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import email.utils
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
from tqdm import tqdm

from service.config import DEFAULT_RECORD_URL
from service.decode import sniff
from service.record.schema import COLUMNS
from service.record.store import (DecisionFilter, RecordError, create_record_engine, current_revision,
                                  iter_decisions, upgrade_schema)

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom",
                  ".dicom": "application/dicom"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}
MAX_RETRY_WAIT_SECONDS = 60.0


class Fatal(Exception):
    """Stop the whole run (bad URL, refused API key): every other file would fail the same way."""


# --- finding the images ----------------------------------------------------------------------------------------------

def _head(path: Path, n: int = 132) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(n)


def find_images(paths: Iterable[Path]) -> tuple[list[Path], int]:
    """The image files under `paths` (files given explicitly are always taken), sorted per folder; and how many
    files in the folders were skipped as not images."""

    found, skipped = [], 0
    for root in paths:
        if root.is_file():
            found.append(root)
            continue
        if not root.is_dir():
            raise Fatal(f"{root}: no such file or folder")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            suffix = path.suffix.lower()
            if path.name.startswith("."):
                skipped += 1
            elif suffix in IMAGE_SUFFIXES or (suffix == "" and sniff(_head(path)) == "dicom"):
                found.append(path)
            else:
                skipped += 1
    return found, skipped


def media_type(data: bytes) -> str:
    """The content type the bytes are (the service checks it against them); octet-stream lets it say why not."""

    return MEDIA_TYPES.get(sniff(data) or "", "application/octet-stream")


# --- sending them ----------------------------------------------------------------------------------------------------

def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def backoff_seconds(attempt: int) -> float:
    return min(0.5 * 2 ** (attempt - 1), 30.0)


@dataclass
class Outcome:
    path: Path
    status: int | None = None
    body: dict | None = None
    error: str | None = None
    attempts: int = 0

    @property
    def answered(self) -> bool:
        return self.status == 200 and self.body is not None


Sleep = Callable[[float], Awaitable[None]]


async def post_with_retries(client: httpx.AsyncClient, data: bytes, retries: int, sleep: Sleep) -> tuple:
    """(response or None, error text or None, attempts): 503 is retried after Retry-After (else backoff), a
    connection error after backoff, `retries` times at most; any other answer is final."""
    headers = {"content-type": media_type(data)}
    for attempt in range(1, retries + 2):
        try:
            response = await client.post("/v1/diagnose", content=data, headers=headers)
        except httpx.TransportError as error:
            if attempt > retries:
                return None, f"{type(error).__name__}: {error}", attempt
            await sleep(backoff_seconds(attempt))
            continue
        if response.status_code == 503 and attempt <= retries:
            wait = retry_after_seconds(response)
            await sleep(min(MAX_RETRY_WAIT_SECONDS, backoff_seconds(attempt) if wait is None else wait))
            continue
        return response, None, attempt
    raise AssertionError("unreachable")


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('reason', 'error')}: {body.get('detail', '')}"
    except ValueError:
        return response.text[:200] or response.reason_phrase


async def diagnose_files(files: list[Path], url: str, *, api_key: str | None = None, concurrency: int = 8,
                         retries: int = 5, timeout: float = 120.0, on_outcome: Callable[[Outcome], None],
                         transport: httpx.AsyncBaseTransport | None = None, sleep: Sleep = asyncio.sleep) -> None:
    """Send every file; `on_outcome` is called once per file, in completion order. Raises `Fatal` on 401."""
    headers = {"x-api-key": api_key} if api_key else {}
    # httpx's pool slows down past a few connections per client (see benchmarks/service.py): one client per 4
    n_clients = max(1, -(-concurrency // 4))
    clients = [httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, transport=transport,
                                 limits=httpx.Limits(max_connections=4)) for _ in range(n_clients)]
    pending = iter(files)

    async def worker(w: int) -> None:
        client = clients[w % n_clients]
        for path in pending:  # one shared iterator: each file goes to exactly one worker
            outcome = Outcome(path)
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except OSError as error:
                outcome.error = f"cannot read the file: {error.strerror or error}"
                on_outcome(outcome)
                continue
            response, outcome.error, outcome.attempts = await post_with_retries(client, data, retries, sleep)
            if response is not None:
                outcome.status = response.status_code
                if response.status_code == 401:
                    raise Fatal(f"the service refused the API key ({_error_text(response)}): set AEGIS_API_KEY "
                                "or --api-key-file")
                if response.status_code == 200:
                    outcome.body = response.json()
                else:
                    outcome.error = _error_text(response)
                    try:
                        outcome.body = {"request_id": response.json().get("request_id")}
                    except ValueError:
                        outcome.body = None
            on_outcome(outcome)

    try:
        tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    finally:
        for client in clients:
            await client.aclose()


# --- results -----------------------------------------------------------------------------------------------------------

def result_row(outcome: Outcome) -> dict:
    body = outcome.body or {}
    answered = outcome.answered
    return {
        "path": str(outcome.path),
        "status": outcome.status,
        "diagnosis": body.get("diagnosis") if answered else None,
        "probabilities": body.get("probabilities") if answered else None,
        "decision": body.get("decision") if answered else None,
        "shield_logit": body.get("shield_logit") if answered else None,
        "threshold": body.get("threshold") if answered else None,
        "request_id": body.get("request_id"),
        "error": outcome.error,
    }


class ResultWriter:
    """One row per file, flushed as it comes (an interrupted run keeps what it finished). CSV has one probability
    column per class (`p_<class>`); JSONL keeps the probabilities as an object."""

    def __init__(self, path: Path, fmt: str, classes: list[str]):
        self.fmt = fmt
        self.classes = classes
        self.handle = open(path, "w", encoding="utf-8", newline="")
        if fmt == "csv":
            self.fields = ["path", "status", "diagnosis", *[f"p_{c}" for c in classes], "decision", "shield_logit",
                           "threshold", "request_id", "error"]
            self.csv = csv.DictWriter(self.handle, fieldnames=self.fields)
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.fmt == "jsonl":
            self.handle.write(json.dumps(row) + "\n")
        else:
            probabilities = row.get("probabilities") or {}
            flat = {k: ("" if v is None else v) for k, v in row.items() if k != "probabilities"}
            flat.update({f"p_{c}": probabilities.get(c, "") for c in self.classes})
            self.csv.writerow(flat)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


@dataclass
class Summary:
    files: int
    skipped: int
    concurrency: int
    answered: int = 0
    errors: Counter = field(default_factory=Counter)
    per_class: dict = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        if outcome.answered:
            self.answered += 1
            counts = self.per_class.setdefault(outcome.body["diagnosis"], {"answered": 0, "rejected": 0})
            counts["answered"] += 1
            counts["rejected"] += outcome.body["decision"] == "reject"
        else:
            self.errors[(outcome.error or "error").split(":")[0] if outcome.status is not None
                        else "no answer"] += 1

    def as_dict(self) -> dict:
        classes = {c: {**v, "rejection_rate": v["rejected"] / v["answered"]} for c, v in sorted(self.per_class.items())}
        rejected = sum(v["rejected"] for v in self.per_class.values())
        return {"files": self.files, "skipped_not_images": self.skipped, "answered": self.answered,
                "errors": sum(self.errors.values()), "errors_by_reason": dict(self.errors),
                "rejected": rejected, "rejection_rate": rejected / self.answered if self.answered else None,
                "per_class": classes, "seconds": self.seconds, "concurrency": self.concurrency,
                "images_per_second": self.answered / self.seconds if self.seconds else None}

    def text(self) -> str:
        d = self.as_dict()
        lines = [f"files: {d['files']} (skipped {d['skipped_not_images']} not images)  answered: {d['answered']}  "
                 f"errors: {d['errors']}" + (f" {d['errors_by_reason']}" if d["errors"] else ""),
                 f"{d['seconds']:.1f} s, {d['images_per_second'] or 0:.1f} images/s at concurrency "
                 f"{d['concurrency']}",
                 f"{'class':<16}{'answered':>10}{'rejected':>10}{'rejection rate':>16}"]
        for name, c in d["per_class"].items():
            lines.append(f"{name:<16}{c['answered']:>10}{c['rejected']:>10}{c['rejection_rate']:>16.3f}")
        if d["answered"]:
            lines.append(f"{'all':<16}{d['answered']:>10}{d['rejected']:>10}{d['rejection_rate']:>16.3f}")
        return "\n".join(lines)


def _api_key(args) -> str | None:
    if args.api_key_file is not None:
        return Path(args.api_key_file).read_text(encoding="utf-8").strip()
    return os.environ.get("AEGIS_API_KEY") or None


def _model_classes(url: str, api_key: str | None, transport=None) -> list[str]:
    """GET /v1/model once before the run: checks the URL and the key, and names the CSV's probability columns."""
    headers = {"x-api-key": api_key} if api_key else {}
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=url, headers=headers, timeout=30, transport=transport) as client:
        while True:
            try:
                response = client.get("/v1/model")
            except httpx.TransportError as error:
                raise Fatal(f"cannot reach the service at {url}: {error}") from None
            if response.status_code == 503 and time.monotonic() < deadline:  # starting up
                time.sleep(retry_after_seconds(response) or 1.0)
                continue
            if response.status_code == 401:
                raise Fatal("the service refused the API key: set AEGIS_API_KEY or --api-key-file")
            if response.status_code != 200:
                raise Fatal(f"GET {url}/v1/model answered {response.status_code}: {_error_text(response)}")
            return list(response.json()["manifest"]["classes"])


def run_diagnose(args, transport=None, sleep: Sleep = asyncio.sleep) -> int:
    files, skipped = find_images([Path(p) for p in args.paths])
    if not files:
        raise Fatal(f"no PNG, JPEG or DICOM file under {' '.join(args.paths)}")
    api_key = _api_key(args)
    classes = _model_classes(args.url, api_key, transport)
    fmt = "jsonl" if args.jsonl or str(args.out).endswith(".jsonl") else "csv"
    writer = ResultWriter(Path(args.out), fmt, classes)
    summary = Summary(files=len(files), skipped=skipped, concurrency=args.concurrency)
    progress = tqdm(total=len(files), unit="image", disable=args.no_progress or None, file=sys.stderr)

    def on_outcome(outcome: Outcome) -> None:
        writer.write(result_row(outcome))
        summary.add(outcome)
        progress.update()

    started = time.perf_counter()
    try:
        asyncio.run(diagnose_files(files, args.url, api_key=api_key, concurrency=args.concurrency,
                                   retries=args.retries, timeout=args.timeout, on_outcome=on_outcome,
                                   transport=transport, sleep=sleep))
    finally:
        summary.seconds = time.perf_counter() - started
        progress.close()
        writer.close()
    print(summary.text(), file=sys.stderr)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.as_dict(), indent=2) + "\n", encoding="utf-8")
    return 0 if summary.answered == summary.files else 1


# --- the decision record -----------------------------------------------------------------------------------------------

def _record_engine(args, must_exist: bool = False):

    url = args.db or os.environ.get("AEGIS_RECORD_URL") or DEFAULT_RECORD_URL
    if must_exist:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
            raise Fatal(f"no decision record at {parsed.database} (give --db or AEGIS_RECORD_URL)")
    password_file = args.password_file or os.environ.get("AEGIS_RECORD_PASSWORD_FILE") or None
    return create_record_engine(url, Path(password_file) if password_file else None)


def _filter(args):

    return DecisionFilter(since=args.since, until=args.until, decision=args.decision, diagnosis=args.diagnosis)


def _rows_from_db(args) -> Iterator[dict]:

    engine = _record_engine(args, must_exist=True)
    try:
        if current_revision(engine) is None:
            raise Fatal(f"no decision record in {engine.url.render_as_string(hide_password=True)}")
        yield from iter_decisions(engine, _filter(args))
    finally:
        engine.dispose()


def _rows_from_api(args) -> Iterator[dict]:
    api_key = _api_key(args)
    params = {k: v for k, v in {"since": args.since, "until": args.until, "decision": args.decision,
                                "diagnosis": args.diagnosis}.items() if v is not None}
    params = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in params.items()}
    with httpx.Client(base_url=args.api, headers={"x-api-key": api_key} if api_key else {}, timeout=60) as client:
        after = 0
        while True:
            response = client.get("/v1/decisions", params={**params, "after_id": after, "limit": 1000})
            if response.status_code != 200:
                raise Fatal(f"GET {args.api}/v1/decisions answered {response.status_code}: {_error_text(response)}")
            page = response.json()
            yield from page["decisions"]
            if page["next_after_id"] is None:
                return
            after = page["next_after_id"]


def write_decisions(rows: Iterable[dict], out, fmt: str) -> int:
    """CSV (probabilities as a JSON object in one column: the classes differ between models) or JSONL."""

    def plain(row: dict) -> dict:
        row = dict(row)
        if isinstance(row.get("decided_at"), datetime):
            row["decided_at"] = row["decided_at"].isoformat()
        return row

    n = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(COLUMNS))
        writer.writeheader()
    for row in rows:
        row = plain(row)
        if fmt == "jsonl":
            out.write(json.dumps(row) + "\n")
        else:
            writer.writerow({**{k: "" if v is None else v for k, v in row.items()},
                             "probabilities": json.dumps(row["probabilities"])})
        n += 1
    return n


def run_export(args) -> int:
    rows = _rows_from_api(args) if args.api else _rows_from_db(args)
    fmt = args.format or ("jsonl" if str(args.out).endswith(".jsonl") else "csv")
    if args.out == "-":
        n = write_decisions(rows, sys.stdout, fmt)
    else:
        with open(args.out, "w", encoding="utf-8", newline="") as out:
            n = write_decisions(rows, out, fmt)
    print(f"exported {n} decisions", file=sys.stderr)
    return 0


def run_migrate(args) -> int:

    engine = _record_engine(args)
    try:
        before = current_revision(engine)
        upgrade_schema(engine)
        print(f"decision record {engine.url.render_as_string(hide_password=True)}: schema {before} -> "
              f"{current_revision(engine)}", file=sys.stderr)
    finally:
        engine.dispose()
    return 0


# --- argument parsing ---------------------------------------------------------------------------------------------------

def _datetime(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _add_diagnose_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (walked recursively)")
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--out", required=True, help="results file: CSV, or JSONL (with --jsonl or a .jsonl name)")
    parser.add_argument("--jsonl", action="store_true", help="write JSON lines instead of CSV")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    parser.add_argument("--retries", type=int, default=5, help="retries of a 503 or connection error per file")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--api-key-file", default=None, help="file holding the API key (default: $AEGIS_API_KEY)")
    parser.add_argument("--summary-json", default=None, help="also write the summary to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_record_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help="database URL (default: AEGIS_RECORD_URL, else "
                                                   "sqlite:///aegis-records.sqlite)")
    parser.add_argument("--password-file", default=None, help="database password file "
                                                              "(default: AEGIS_RECORD_PASSWORD_FILE)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.cli", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_diagnose_args(commands.add_parser("diagnose", help="diagnose every image under PATH... (batch client)"))
    export = commands.add_parser("export-decisions", help="export the decision record (CSV or JSONL)")
    _add_record_args(export)
    export.add_argument("--api", default=None, metavar="URL",
                        help="read through GET /v1/decisions of this service instead of the database")
    export.add_argument("--api-key-file", default=None, help="with --api: file holding the API key "
                                                             "(default: $AEGIS_API_KEY)")
    export.add_argument("--out", default="-", help="output file (default: stdout)")
    export.add_argument("--format", choices=["csv", "jsonl"], default=None,
                        help="default: jsonl for a .jsonl file, else csv")
    export.add_argument("--since", type=_datetime, default=None, help="decided at or after (ISO 8601, UTC default)")
    export.add_argument("--until", type=_datetime, default=None, help="decided before (ISO 8601, UTC default)")
    export.add_argument("--decision", choices=["accept", "reject"], default=None)
    export.add_argument("--diagnosis", default=None, help="predicted class name")
    _add_record_args(commands.add_parser("migrate", help="upgrade the decision record's schema to the latest"))
    return parser


def _run(command: Callable[[], int]) -> int:
    from sqlalchemy.exc import SQLAlchemyError


    try:
        return command()
    except (Fatal, RecordError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SQLAlchemyError as error:  # the DBAPI's message; the statement and its parameters stay out
        print(f"error: the decision record's database: {str(getattr(error, 'orig', None) or error).splitlines()[0]}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    run = {"diagnose": run_diagnose, "export-decisions": run_export, "migrate": run_migrate}[args.command]
    return _run(lambda: run(args))


def diagnose_main(argv: list[str] | None = None) -> int:
    """The `aegis-diagnose` console script: `python -m service.cli diagnose` without the word `diagnose`."""
    return main(["diagnose", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
