"""The benchmark script runs (figures are printed, not asserted: it is not a timed test)."""

from __future__ import annotations

import json

from service.bench import main
from tests.service.conftest import SAMPLES


def test_benchmark_in_process_figures_are_produced(bundle_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--bundle", str(bundle_dir), "--seconds", "0.05", "--skip-http", "--threads", "1",
                 "--images", str(SAMPLES[0].parent / "*.png"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["raw_ort_images_per_second"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert figures["raw_ort_best"]["images_per_second"] > 0
    cost = figures["defence_cost"]
    assert cost["cushion_seconds_per_image"] > 0 and cost["classifier_only_images_per_second"] > 0
    assert "limit" in capsys.readouterr().out
