"""The benchmark script runs and drives what it says it drives (figures are printed, not asserted: it is not a
timed test)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from benchmarks.service import main
from tests.service.conftest import SAMPLES

ALL_CPUS = os.sched_getaffinity(0)


def test_benchmark_in_process_figures_are_produced(tiny_bundle_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--bundle", str(tiny_bundle_dir), "--seconds", "0.05", "--skip-http", "--threads", "1",
                 "--images", str(SAMPLES[0].parent / "*.png"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["raw_ort_images_per_second"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert figures["raw_ort_best"]["images_per_second"] > 0
    cost = figures["defence_cost"]
    assert cost["cushion_seconds_per_image"] > 0 and cost["classifier_only_images_per_second"] > 0
    assert "limit" in capsys.readouterr().out


def test_cpu_lists_parse():
    from benchmarks.service import parse_cpus

    assert parse_cpus("0") == {0} and parse_cpus("0,2") == {0, 2} and parse_cpus("1-3,6") == {1, 2, 3, 6}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_pinned_benchmark_keeps_the_server_and_the_client_apart(tiny_bundle_dir, tmp_path):
    out = tmp_path / "bench.json"
    server = min(os.sched_getaffinity(0))
    try:
        assert main(["--bundle", str(tiny_bundle_dir), "--seconds", "0.3", "--concurrency", "4",
                     "--server-cpus", str(server), "--images", str(SAMPLES[0].parent / "*.png"),
                     "--json", str(out)]) == 0
    finally:
        os.sched_setaffinity(0, ALL_CPUS)  # main() pins this (test) process
    figures = json.loads(out.read_text())
    assert figures["server_cpus"] == [server] and server not in figures["client_cpus"]
    assert figures["service_process_cpus"] == [server] and figures["naive_process_cpus"] == [server]
    for name in ("service", "naive"):
        row = figures[name][0]
        assert row["concurrency"] == 4 and row["requests_per_second"] > 0 and row["errors"] == 0
        assert row["server_cores"] <= 1.05  # one CPU's worth at most, /proc accounting


def test_replicas_share_the_load_each_with_its_own_client(tiny_bundle_dir, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--bundle", str(tiny_bundle_dir), "--seconds", "0.3", "--concurrency", "3", "--threads", "1",
                 "--replicas", "2", "--images", str(SAMPLES[0].parent / "*.png"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["replicas"] == 2
    for name in ("service", "naive"):
        row = figures[name][0]
        assert row["replicas"] == 2 and row["errors"] == 0
        assert len(row["answered_per_replica"]) == 2 and min(row["answered_per_replica"]) > 0  # both replicas served
        assert row["requests_per_second"] > 0


@pytest.mark.parametrize("client", ["httpx", pytest.param("wrk", marks=pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is a Debian package (scripts/ci-system-deps.sh installs it)"))])
def test_other_load_generators_drive_the_service(client, tiny_bundle_dir, tmp_path):
    """One plain httpx AsyncClient (what an integrator writes first) and wrk (a C load generator) give the same kind
    of row as the default client: answered requests, latency percentiles, no errors."""
    out = tmp_path / "bench.json"
    assert main(["--bundle", str(tiny_bundle_dir), "--seconds", "1", "--concurrency", "4", "--threads", "1",
                 "--service-only", "--client", client, "--images", str(SAMPLES[0].parent / "*.png"),
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    row = figures["service"][0]
    assert figures["client"] == client and row["client"] == client
    assert row["requests_per_second"] > 0 and row["errors"] == 0
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert row["server_cores"] > 0


def test_workers_are_driven_and_their_cpu_counted(tiny_bundle_dir, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--bundle", str(tiny_bundle_dir), "--seconds", "1", "--concurrency", "4", "--service-only",
                 "--workers", "2", "--images", str(SAMPLES[0].parent / "*.png"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    row = figures["service"][0]
    assert figures["workers"] == 2 and row["errors"] == 0 and row["requests_per_second"] > 0
    # the supervisor itself does no request work: cores this large come from its worker processes
    assert row["server_cores"] > 0.2


def test_null_model_rows_give_the_service_cpu_per_request(tiny_bundle_dir, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--bundle", str(tiny_bundle_dir), "--seconds", "0.5", "--concurrency", "2", "--threads", "1",
                 "--service-only", "--null-model", "--images", str(SAMPLES[0].parent / "*.png"),
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    row = figures["service"][0]
    assert figures["model"].startswith("null") and row["errors"] == 0 and row["requests_per_second"] > 0
    assert row["server_cpu_ms_per_request"] == pytest.approx(row["server_cores"] / row["requests_per_second"] * 1e3)


def test_the_null_runner_has_the_graph_output_shapes(tiny_bundle_dir):
    from benchmarks.service import null_runner
    from models.bundle import load_bundle

    bundle = load_bundle(tiny_bundle_dir)
    logits, shield = null_runner(bundle, None)(np.zeros((3, 1, 8, 8), np.float32))
    assert logits.shape == shield.shape == (3, len(bundle.manifest.classes))
