"""The security report lands in a (copied) bundle that still verifies, and the attack adapter's contract."""

import json
import shutil

import pytest
import torch

from models.bundle import load_bundle
from training.attacks.library import build_attack
from training.audit.__main__ import main
from training.audit.attacks import AttackUnavailable, describe, make_attack


def test_security_report_lands_in_the_bundle_and_hashes_stay_valid(tiny_run, tiny_bundle_dir, kermany_dir,
                                                                     tmp_path):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle_dir)
    assert main(["report", "--bundle", str(bundle_dir), "--scale", "tiny", "--data-dir", str(kermany_dir),
                 "--set", "eval_images=6", "--set", "bootstrap=50", "--substitute", str(tiny_run)]) == 0
    bundle = load_bundle(bundle_dir)  # raises if any hash is stale
    assert bundle.manifest.reports["security_report"] == "security_report.json"
    assert bundle.manifest.reports["security_report_md"] == "security_report.md"
    report = bundle.report("security_report")
    assert report["scale"]["name"] == "tiny" and isinstance(report["sanity_flags"], list)
    names = {row["attack"] for row in report["rows"]}
    assert {"pgd20", "wb4", "wbd4", "spgd4"} <= names  # the acceptance suite at this scale
    assert {"wb_n14", "wb_n1_ti4", "wb_diffjpeg4", "wb_eot4", "tim3"} <= names  # and the attacks beyond the paper
    assert {"pgd20@8", "wb4@8", "wb_n14@8", "wb_eot4@8"} <= names  # every attack at every report budget
    transfer = [row for row in report["rows"] if row["attack"].startswith("tf")]  # --substitute: the transfer too
    assert sorted(row["eps"] for row in transfer) == [8 / 256, 16 / 256]
    assert all(row["attempted"] > 0 for row in transfer)
    for row in report["rows"]:
        assert row["max_linf"] <= row["eps"] + 1e-6
        assert 0 <= row["bypass_rate"] <= row["asr_label"] <= 1
        low, high = row["bypass_rate_ci95"]
        assert low <= row["bypass_rate"] <= high
    # The figure an attacker picks: the highest bypass over every attack and report budget (not the 64/256 sweep).
    in_model = [row for row in report["rows"] if row["eps"] in (8 / 256, 16 / 256)]
    assert report["max_bypass"]["bypass_rate"] == max(row["bypass_rate"] for row in in_model)
    assert all(row["in_threat_model"] == (row in in_model) for row in report["rows"])
    # Every attack tried on each image: at least the best single row at or below each budget, never less at 16.
    any_rows = report["any_attack"]
    assert [row["eps_256"] for row in any_rows] == [8, 16]
    for row in any_rows:
        single = max(r["bypass_rate"] for r in in_model if r["eps_256"] <= row["eps_256"])
        assert single <= row["bypass_rate"] <= 1 and row["attempted"] == report["max_bypass"]["attempted"]
    assert any_rows[0]["bypass_rate"] <= any_rows[1]["bypass_rate"]
    assert "every attack tried on each image" in bundle.report("security_report_md")
    assert [row["eps_256"] for row in report["ceiling"]["rows"]] == [8, 16]
    assert "Robust accuracy of Cushion + classifier" in bundle.report("security_report_md")
    assert report["roc_plot"] in bundle.manifest.files
    assert (bundle_dir / report["roc_plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SANITY FLAGS" in bundle.report("security_report_md")
    json.dumps(report)  # NaN-free: strict JSON for the service
    # The model card carries the report's verdict, once, and a second report replaces it rather than adding one.
    from training.audit.report import CARD_BEGIN, write_into_bundle

    strongest = report["max_bypass"]
    assert bundle.model_card().count(CARD_BEGIN) == 1
    assert f"**{strongest['attack']}** at {strongest['eps_256']:g}/256" in bundle.model_card()
    assert f"{strongest['bypass_rate']:.0%} of attempted" in bundle.model_card()
    assert "Robust accuracy of Cushion + classifier" in bundle.model_card()
    write_into_bundle(bundle, report)
    again = load_bundle(bundle_dir)
    assert again.model_card().count(CARD_BEGIN) == 1 and again.model_card().startswith("# Model card")


def test_a_screen_runs_the_chosen_attacks_at_every_budget_and_leaves_the_bundle_alone(tiny_bundle_dir, kermany_dir,
                                                                                      tmp_path):
    before = (tiny_bundle_dir / "manifest.json").read_bytes()
    assert main(["report", "--bundle", str(tiny_bundle_dir), "--scale", "tiny", "--data-dir", str(kermany_dir),
                 "--set", "eval_images=4", "--set", "bootstrap=20", "--attacks", "pgd,wb_n1",
                 "--out", str(tmp_path)]) == 0
    assert (tiny_bundle_dir / "manifest.json").read_bytes() == before  # a screen is not the bundle's report
    screen = json.loads((tmp_path / "screen.json").read_text())
    assert screen["screen"] == ["pgd", "wb_n1"] and screen["title"].startswith("Security screen (pgd, wb_n1 only)")
    assert sorted(row["attack"] for row in screen["rows"]) == ["pgd20", "pgd20@8", "wb_n14", "wb_n14@8"]
    assert screen["max_bypass"]["bypass_rate"] == max(row["bypass_rate"] for row in screen["rows"])
    assert [row["eps_256"] for row in screen["ceiling"]["rows"]] == [8, 16]
    with pytest.raises(ValueError, match="unknown report attacks"):
        main(["report", "--bundle", str(tiny_bundle_dir), "--scale", "tiny", "--data-dir", str(kermany_dir),
              "--attacks", "wb100", "--out", str(tmp_path)])


def test_an_interrupted_report_resumes_from_its_attack_cache_with_the_same_figures(tiny_bundle_dir, kermany_dir,
                                                                                   tiny_run, tmp_path, monkeypatch):
    from training.audit import harness, report

    calls, ceilings = [], []
    run_attack = harness.run_attack
    monkeypatch.setattr(harness, "run_attack", lambda *a, **k: calls.append(a[1].spec.name) or run_attack(*a, **k))
    robust_accuracy = report.robust_accuracy
    monkeypatch.setattr(report, "robust_accuracy", lambda *a, **k: ceilings.append(1) or robust_accuracy(*a, **k))
    cache = tmp_path / "cache"

    def screen(out: str, *extra: str, attacks: str = "pgd,wb_n1") -> dict:
        assert main(["report", "--bundle", str(tiny_bundle_dir), "--scale", "tiny", "--data-dir", str(kermany_dir),
                     "--set", "eval_images=4", "--set", "bootstrap=20", "--attacks", attacks,
                     "--attack-cache", str(cache), "--out", str(tmp_path / out), *extra]) == 0
        return json.loads((tmp_path / out / "screen.json").read_text())

    first = screen("first")
    assert len(calls) == 4 and len(list(cache.glob("*.pt"))) == 4  # two attacks at two budgets, each kept
    next(cache.glob("wb_n14@8-*.pt")).unlink()  # as if the run had stopped before its last row
    calls.clear()
    again = screen("again")
    assert calls == ["wb_n1"]  # only the missing row (the library's spec name) is attacked again
    assert len(ceilings) == 1  # the ceiling (as costly as several rows) is kept too
    assert again["rows"] == first["rows"]
    assert again["any_attack"] == first["any_attack"] and again["ceiling"] == first["ceiling"]
    calls.clear()
    screen("transfer", "--substitute", str(tiny_run), attacks="pgd,tf")
    assert calls == ["transfer_vgg16"] * 2  # the white-box rows do not depend on the substitute: kept
    calls.clear()
    screen("other-seed", "--seed", "1")  # other images and targets: nothing is reused
    assert len(calls) == 4 and len(ceilings) == 2


def test_attacks_that_lack_their_inputs_are_unavailable_not_substituted():
    with pytest.raises(AttackUnavailable, match="guide_pool"):
        make_attack("hfc", eps=16 / 256, steps=10, thresholds=torch.zeros(2))
    with pytest.raises(AttackUnavailable, match="substitute"):
        make_attack("tf", eps=16 / 256, steps=10)
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("pgd_l7", eps=16 / 256, steps=10)


def test_adapter_maps_the_tables_names_onto_the_library():
    thresholds = torch.zeros(2)
    wbd = make_attack("wbd", eps=16 / 256, steps=100, thresholds=thresholds)
    assert wbd.sees_shield and wbd.family == "wbd" and (wbd.spec.eps, wbd.spec.steps) == (16 / 256, 100)
    pgd = make_attack("pgd", eps=8 / 256, steps=10, thresholds=thresholds)
    assert not pgd.sees_shield and pgd.spec.name == "pgd_linf" and pgd.spec.eps == 8 / 256
    assert describe(build_attack("pgd_linf", steps=20)).family == "pgd_linf"


def test_every_adaptive_attack_with_a_cw_margin_gets_the_bundles_kappa():
    """A new adaptive attack with a `kappa` must be listed (or knowingly kept out, like HFC's own scale)."""
    import inspect

    from training.attacks.library import ATTACKS
    from training.audit.attacks import CONVENTIONAL, TAKES_BUNDLE_KAPPA

    with_margin = {name for name, entry in ATTACKS.items() if "kappa" in inspect.signature(entry.build).parameters}
    assert TAKES_BUNDLE_KAPPA == with_margin - CONVENTIONAL - {"hfc", "hfc_cw", "hfc_ref"}  # HFC: its own kappa 100
    assert "kappa=3" in make_attack("wb", eps=16 / 256, steps=5, thresholds=torch.zeros(2), kappa=3.0).spec.description


def test_any_attack_counts_an_image_once_when_some_attack_at_or_below_the_budget_passes():
    import numpy as np

    from training.audit.report import any_attack

    outcomes = [(4 / 256, np.array([1, 0, 0, 0], bool)), (4 / 256, np.array([0, 1, 0, 0], bool)),
                (16 / 256, np.array([1, 0, 1, 0], bool))]  # image 3 resists everything
    rows = any_attack(outcomes, n_resamples=50, seed=0)
    assert [(r["eps_256"], r["bypass_rate"], r["attempted"]) for r in rows] == [(4, 0.5, 4), (16, 0.75, 4)]
    assert all(low <= r["bypass_rate"] <= high for r in rows for low, high in [r["bypass_rate_ci95"]])


def test_the_randomised_cushion_study_recalibrates_and_judges_both_cushions_on_the_same_images(
        tiny_bundle_dir, kermany_dir, tmp_path):
    assert main(["randomised", "--bundle", str(tiny_bundle_dir), "--scale", "tiny", "--data-dir", str(kermany_dir),
                 "--set", "eval_images=4", "--set", "bootstrap=20", "--set", "adaptive_steps=2", "--tries", "3",
                 "--randomised-cushion", "quality_spread=5,max_shift=1", "--out", str(tmp_path)]) == 0
    study = json.loads((tmp_path / "randomised.json").read_text())
    rows = study["rows"]
    assert {(r["cushion"], r["attack"], r["eps_256"]) for r in rows} == {
        (c, a, e) for e in (8, 16)
        for c, a in (("fixed", "wb_diffjpeg"), ("randomised", "wb_diffjpeg"), ("randomised", "wb_eot_cushion"))}
    assert len({r["attempted"] for r in rows}) == 1
    for row in rows:
        assert 0 <= row["bypass_rate"] <= row["bypass_rate_tries"] <= 1  # more requests never pass less
        assert row["tries"] == (3 if row["cushion"] == "randomised" else 1)
        if row["cushion"] == "fixed":
            assert row["bypass_rate"] == row["bypass_rate_tries"]
    assert set(study["clean"]) == {"fixed", "randomised"} and "quality_spread=5" in study["notes"][0]
    assert set(study["randomised_thresholds"]) == set(study["bundle"]["thresholds"])


def test_a_second_opinion_accepts_only_what_both_the_shield_and_the_referee_accept(tiny_bundle_dir):
    from models.networks import MarginShields, load_aegis
    from training.audit.second_opinion import SecondOpinion

    net = load_aegis(load_bundle(tiny_bundle_dir))
    referee = load_aegis(load_bundle(tiny_bundle_dir))
    with torch.no_grad():  # a referee that differs from the primary's classifier
        for p in referee.classifier.head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.rand(16, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own_logits, own_shields = net(x)
        confidence = MarginShields()(referee.classifier(x))
        # thresholds at each detector's lower quartile: each rejects a quarter, so the pair rejects some, never all
        t, r = own_shields.quantile(0.25, dim=0), confidence.quantile(0.25, dim=0)
        pair = SecondOpinion(net, referee, t.numpy(), r.numpy()).eval()
        logits, shields = pair(x)
    assert torch.equal(logits, own_logits)  # the bundle diagnoses
    accepted = shields >= 0
    assert torch.equal(accepted, (own_shields >= t) & (confidence >= r))  # and both must accept
    assert 0 < accepted.float().mean() < 1  # the rule is exercised both ways on these images
    # a Shield-blind attack on the pair is an attack on the classifier that diagnoses, not on the referee
    from training.audit.attacks import make_attack, run_attack

    pgd, targets = make_attack("pgd", eps=8 / 256, steps=2), 1 - logits.argmax(1)
    assert torch.equal(run_attack(pair, pgd, x, targets, None, seed=3), run_attack(net, pgd, x, targets, None, seed=3))


def test_the_second_opinion_study_screens_the_pair_and_keeps_the_bundle_diagnosis(tiny_bundle_dir, kermany_dir,
                                                                                  tmp_path):
    assert main(["second-opinion", "--bundle", str(tiny_bundle_dir), "--referee", str(tiny_bundle_dir),
                 "--scale", "tiny", "--data-dir", str(kermany_dir), "--set", "eval_images=4", "--set", "bootstrap=20",
                 "--set", "adaptive_steps=2", "--attacks", "wb_n1", "--out", str(tmp_path)]) == 0
    study = json.loads((tmp_path / "second_opinion.json").read_text())
    assert {(row["attack"], row["eps_256"]) for row in study["rows"]} == {("wb_n12@8", 8.0), ("wb_n12", 16.0)}
    clean = study["clean"]
    assert clean["pair"]["accuracy_cushion"] == clean["bundle"]["accuracy_cushion"]
    assert clean["pair"]["clean_rejection_rate"] >= 0 and set(study["pair_thresholds"]) == set(study["referee"]["thresholds"])
    assert "Second opinion" in study["notes"][0] and study["ceiling"]
