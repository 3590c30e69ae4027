"""`python -m service.soak`, the short run (CI): mixed load with bursts, a restart and a final SIGTERM, nothing lost;
and its checks can fail (a wrong answer, an answer lost, a 503 without Retry-After, no overload at all)."""

from __future__ import annotations

import json
from collections import Counter

import httpx

from service import soak
from service.soak import Case, Outcome, Soak
from tests.service.conftest import REPO


def test_short_soak_run_loses_nothing_and_every_200_equals_the_offline_reference(image_paths, tmp_path):
    out = tmp_path / "soak.json"
    status = soak.main(["--seconds", "20", "--images", *map(str, image_paths), "--burst", "48", "--burst-every",
                        "4", "--restarts", "1", "--json", str(out)])
    summary = json.loads(out.read_text())
    assert status == 0, summary["violations"]
    assert summary["violations"] == [] and summary["lost"] == 0 and summary["duplicated"] == 0
    assert summary["mismatches"] == 0 and summary["checked_200"] == summary["record_rows"] > 100
    assert summary["reasons_503"].get("overloaded", 0) > 0
    assert set(summary["by_case"]) >= {"png", "jpeg", "dicom", "multipart_png", "text", "wrong_api_key"}
    assert summary["by_case"]["wrong_api_key"].get("401", 0) > 0
    assert all(int(code) < 500 or code == "503" for code in summary["statuses"] if code != "refused")
    assert [t["exit_status"] for t in summary["lifetimes"]] == [0, 0]
    assert all(t["rss_start_mb"] > 50 and t["rss_end_mb"] > 50 for t in summary["lifetimes"])


def _soak(cases: list[Case]) -> Soak:
    server = soak.ServerProcess([], {}, REPO / "unused.log", port=1)
    return Soak(server, cases, [], "key", seconds=1, max_requests=10, concurrency=1, burst=1, burst_every=1,
                bad_fraction=0, restarts=0, seed=0)


def _answer(request_id: str, status: int = 200, headers: dict | None = None, **body) -> httpx.Response:
    return httpx.Response(status, json={"request_id": request_id, **body}, headers=headers)


def test_the_soak_checks_can_fail():
    reference = {"diagnosis": "NORMAL", "decision": "accept", "shield_logit": 1.5, "threshold": 0.0}
    image = Case("png", b"x", "image/png", reference=reference)
    run = _soak([image])
    wrong, right, lost, unsent = (Outcome(f"soak-{i}", "png", status=200) for i in range(4))
    run.check(wrong, image, _answer("soak-0", **{**reference, "shield_logit": 1.6}))
    assert wrong.problem.startswith("mismatch")
    run.check(right, image, _answer("soak-1", **reference))
    run.check(lost, image, _answer("soak-2", **reference))
    assert right.problem is None and lost.problem is None
    no_retry = Outcome("soak-4", "png", status=503)
    run.check(no_retry, image, _answer("soak-4", 503, reason="overloaded"))
    assert no_retry.problem == "503 overloaded without Retry-After"
    crashed = Outcome("soak-5", "png", status=500)
    run.check(crashed, image, _answer("soak-5", 500, reason="internal"))
    assert crashed.problem.startswith("status 500")

    run.outcomes = [wrong, right, lost, no_retry, crashed]
    # the record: soak-2 was never written (its 200 is an answer without a record), soak-4 was written although
    # its client got a 503, and soak-9 was never sent
    summary = run.summarize(Counter({"soak-0": 1, "soak-1": 1, "soak-4": 1, "soak-9": 1}), 1.0)
    assert summary.mismatches == 1 and summary.lost == 2
    text = "\n".join(summary.violations)
    for expected in ("soak-2 (png): answered 200 but recorded 0 times", "503 overloaded without Retry-After",
                     "status 500", "1 recorded request ids were never sent"):
        assert expected in text, text
    run.outcomes = [right]
    assert run.summarize(Counter({"soak-1": 1}), 1.0).violations == [
        "no request was refused for overload: the bursts never went over capacity (raise --burst or lower "
        "--max-queue)"]
