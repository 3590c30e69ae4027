"""Every 200 answer under concurrent load has exactly one row in the decision record, across a graceful restart.

Starts `python -m service` (the default bundle, auth disabled, on loopback) writing to `--record-url`, drives it with
`--concurrency` closed-loop clients for `--seconds`, keeps the request id of every 200 answer, stops the service with
SIGTERM (the shutdown flush), then reads the record: the ids must match one to one. Prints the figures as JSON and
exits 1 on any mismatch. Not a test (it runs for a minute); the in-suite version is tests/service/test_record.py.

    python scripts/record_load_check.py --record-url sqlite:////tmp/check.sqlite --seconds 60 --concurrency 8
    python scripts/record_load_check.py --record-url "$(bash scripts/ci-postgres.sh)" --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.service import DEFAULT_IMAGES, start_server  # noqa: E402
from service.record.schema import decisions  # noqa: E402
from service.record.store import count_decisions, create_record_engine, current_revision  # noqa: E402


async def load(base: str, images: list[bytes], concurrency: int, seconds: float) -> tuple[list[str], Counter]:
    answered: list[str] = []
    refused: Counter = Counter()
    n_clients = max(1, -(-concurrency // 4))  # as benchmarks.service: one httpx client per 4 connections
    clients = [httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=4))
               for _ in range(n_clients)]
    until = time.monotonic() + seconds

    async def worker(w: int) -> None:
        i = w
        while time.monotonic() < until:
            r = await clients[w % n_clients].post("/v1/diagnose", content=images[i % len(images)],
                                                  headers={"content-type": "image/png"})
            if r.status_code == 200:
                answered.append(r.json()["request_id"])
            else:
                refused[r.status_code] += 1
            i += concurrency

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        for client in clients:
            await client.aclose()
    return answered, refused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record-url", required=True, help="an empty or new decision record database")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--images", nargs="+", default=DEFAULT_IMAGES, help="PNG globs (first 256 files)")
    args = parser.parse_args(argv)

    engine = create_record_engine(args.record_url)
    if current_revision(engine) is not None and count_decisions(engine):
        parser.error("the record already holds decisions: give an empty or new database")
    images = [Path(f).read_bytes() for f in sorted({f for p in args.images for f in glob.glob(p)})[:256]]
    env = {"AEGIS_AUTH_DISABLED": "true", "AEGIS_LOG_LEVEL": "WARNING", "AEGIS_RECORD_URL": args.record_url}
    server, base = start_server(["-m", "service", *(["--bundle", args.bundle] if args.bundle else [])], env)
    try:
        started = time.perf_counter()
        answered, refused = asyncio.run(load(base, images, args.concurrency, args.seconds))
        elapsed = time.perf_counter() - started
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(120)
    with engine.connect() as connection:
        ids = Counter(connection.execute(select(decisions.c.request_id)).scalars())
    engine.dispose()
    sent = Counter(answered)
    figures = {
        "record": engine.url.render_as_string(hide_password=True), "seconds": round(elapsed, 1),
        "concurrency": args.concurrency, "answered_200": len(answered), "refused": dict(refused),
        "requests_per_second": round(len(answered) / elapsed, 1), "rows": sum(ids.values()),
        "answers_without_row": sum((sent - ids).values()), "rows_without_answer": sum((ids - sent).values()),
        "request_ids_twice_in_rows": sum(1 for n in ids.values() if n > 1), "server_exit_code": exit_code,
    }
    print(json.dumps(figures))
    exact = ids == sent and exit_code == 0 and len(answered) > 0
    print("every 200 answer has exactly one row" if exact else "MISMATCH", file=sys.stderr)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
