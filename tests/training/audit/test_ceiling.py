"""The robustness ceiling: APGD-CE robust accuracy of Cushion + classifier, the bound Tramèr (2022) puts on detection."""

import json

import numpy as np

from models.cushion import JpegCushion
from training.audit.__main__ import main
from training.audit.ceiling import robust_accuracy
from training.inference import predict


def test_ceiling_is_one_below_a_grey_level_and_falls_as_the_budget_grows(small_net, xray_data):
    _, _, x, y = xray_data
    y = y.numpy()
    classifier, cushion = small_net.classifier, JpegCushion()
    result = robust_accuracy(classifier, x, y, cushion, n_images=24, steps=10, budgets=(0.5 / 256, 4 / 256, 64 / 256),
                             n_resamples=100)
    expected_accuracy = float((predict(classifier, x, cushion)[0].argmax(1) == y).mean())
    assert result["clean_accuracy"] == expected_accuracy
    below_a_level, small, large = result["rows"]
    assert below_a_level["robust_of_correct"] == 1.0  # uint8 quantisation: nothing moves under half a grey level
    assert large["robust_of_correct"] <= 0.1  # an undefended small net falls at 64/256
    assert below_a_level["robust_of_correct"] >= small["robust_of_correct"] >= large["robust_of_correct"]  # always
    with_larger_first = robust_accuracy(classifier, x, y, cushion, n_images=24, steps=10,
                                        budgets=(64 / 256, 4 / 256), n_resamples=100)
    assert [r["eps_256"] for r in with_larger_first["rows"]] == [4, 64]  # ascending, whatever order was asked
    for row in result["rows"]:
        assert set(row["robust_of_correct_by_backward"]) == {"identity", "diffjpeg"}
        # robust means robust to both gradients: never more than either alone
        assert row["robust_of_correct"] <= min(row["robust_of_correct_by_backward"].values())
        low, high = row["robust_of_correct_ci95"]
        assert low <= row["robust_of_correct"] <= high
        assert np.isclose(row["robust_accuracy"], expected_accuracy * row["robust_of_correct"])


def test_ceiling_command_writes_its_table(tiny_bundle_dir, kermany_dir, tmp_path):
    out = tmp_path / "ceiling"
    assert main(["ceiling", "--bundle", str(tiny_bundle_dir), "--scale", "tiny", "--data-dir", str(kermany_dir),
                 "--out", str(out)]) == 0
    result = json.loads((out / "ceiling.json").read_text())
    assert [r["eps_256"] for r in result["rows"]] == [4, 8, 16]
    assert "APGD-CE" in (out / "ceiling.md").read_text()


def test_ceiling_options_change_what_is_attacked(tiny_bundle_dir, kermany_dir, tmp_path):
    """--ceiling-cushion none measures the classifier alone (one backward: nothing to differentiate through), and
    --ceiling-split train attacks training-split images (robust overfitting)."""
    out = tmp_path / "ceiling"
    assert main(["ceiling", "--bundle", str(tiny_bundle_dir), "--scale", "tiny", "--data-dir", str(kermany_dir),
                 "--ceiling-cushion", "none", "--ceiling-split", "train", "--out", str(out)]) == 0
    result = json.loads((out / "ceiling.json").read_text())
    assert result["cushion"] == "none()" and result["split"] == "train"
    assert all(set(r["robust_of_correct_by_backward"]) == {"identity"} for r in result["rows"])
    assert "train images" in (out / "ceiling.md").read_text()
