"""The security report lands in a (copied) bundle that still verifies, and the attack adapter's contract."""

import json
import shutil

import pytest

from models.bundle import load_bundle
from training.audit.__main__ import main
from training.audit.attacks import make_attack


def test_security_report_lands_in_the_bundle_and_hashes_stay_valid(tiny_bundle_dir, kermany_dir, tmp_path):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle_dir)
    assert main(["report", "--bundle", str(bundle_dir), "--scale", "tiny", "--data-dir", str(kermany_dir),
                 "--set", "eval_images=6", "--set", "bootstrap=50"]) == 0
    bundle = load_bundle(bundle_dir)  # raises if any hash is stale
    assert bundle.manifest.reports["security_report"] == "security_report.json"
    assert bundle.manifest.reports["security_report_md"] == "security_report.md"
    report = bundle.report("security_report")
    assert report["scale"]["name"] == "tiny" and isinstance(report["sanity_flags"], list)
    names = {row["attack"] for row in report["rows"]}
    assert {"pgd20", "wb4", "wbd4", "spgd4"} <= names  # the acceptance suite at this scale
    for row in report["rows"]:
        assert row["max_linf"] <= row["eps"] + 1e-6
        assert 0 <= row["bypass_rate"] <= row["asr_label"] <= 1
    assert report["roc_plot"] in bundle.manifest.files
    assert (bundle_dir / report["roc_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SANITY FLAGS" in bundle.report("security_report_md")
    json.dumps(report)  # NaN-free: strict JSON for the service


def test_missing_attacks_raise_naming_what_is_missing():
    with pytest.raises(NotImplementedError, match="HFC.*library.py"):
        make_attack("hfc_pgd", eps=16 / 256, steps=10)
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("pgd_l7", eps=16 / 256, steps=10)


def test_adapter_attacks_respect_their_budget_and_signature():
    attack = make_attack("wbd", eps=16 / 256, steps=100)
    assert attack.sees_shield and attack.spec.config.decay_steps == (50,)
    assert not make_attack("pgd", eps=16 / 256, steps=10).sees_shield
