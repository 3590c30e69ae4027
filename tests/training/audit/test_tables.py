"""Paper tables that retrain Shields (Table 5), on the tiny bundle."""

import json
import shutil

from models.bundle import Manifest, write_manifest
from training.audit.__main__ import main


def test_table5_retrains_shields_for_every_variant_of_a_bundle_trained_with_the_differentiable_jpeg(
        tiny_bundle_dir, kermany_dir, tmp_path):
    """2.2.0's Shields trained with attack_bpda=diffjpeg; the Cushion variants without JPEG (none, bit depth, TV) have
    no differentiable backward and once stopped the whole table with a ValueError."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle)
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    write_manifest(bundle, manifest.model_copy(update={"training": {**manifest.training, "attack_bpda": "diffjpeg"}}))
    out = tmp_path / "table5"
    assert main(["table5", "--bundle", str(bundle), "--scale", "tiny", "--data-dir", str(kermany_dir),
                 "--attacks", "pgd", "--out", str(out)]) == 0
    rows = json.loads((out / "table5.json").read_text())["rows"]
    assert {r["variant"] for r in rows if r["ablation"] == "cushion"} == {
        "none", "jpeg:90", "jpeg:80", "jpeg:70", "bitdepth:5", "bitdepth:4", "tv"}
    assert all(r["status"] == "ok" for r in rows)
    # the classifier is frozen: every layer variant (same Cushion) classifies the clean images alike
    assert len({r["clean_accuracy"] for r in rows if r["ablation"] == "layers"}) == 1
