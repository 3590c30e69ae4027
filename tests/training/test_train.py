"""The training entry point end to end (tiny, real images), resume, presets, DDP, and a Shield that learns."""

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.bundle import load_bundle
from models.networks import build_aegis
from models.cushion import JpegCushion
from training.config import PRESETS_DIR, TrainConfig, load_config
from training.train import main
from tests.conftest import REPO


def test_tiny_run_produces_a_complete_bundle(tiny_run):
    bundle = load_bundle(tiny_run / "bundle")
    metrics = bundle.manifest.metrics
    assert set(metrics["attacks"]) == {"pgd20", "wb3", "wbd3", "spgd3"}
    for figures in metrics["attacks"].values():
        assert figures["max_linf"] <= 16 / 256 + 1e-6
        assert 0 <= figures["bypass_rate"] <= figures["asr_label"] <= 1
    assert metrics["clean"]["n"] == 48
    assert len(metrics["history"]["classifier"]) == 1 and len(metrics["history"]["shield"]) == 1
    assert json.loads((tiny_run / "config.json").read_text())["name"] == "aegis-tiny"
    assert "classifier epoch 1/1" in (tiny_run / "train.log").read_text()


def test_resume_continues_after_the_last_epoch(tiny_run, tmp_path, kermany_dir):
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    assert main(["--preset", "tiny", "--data-dir", str(kermany_dir), "--out", str(run), "--resume",
                 "--set", "shield_epochs=2", "--skip-eval"]) == 0
    history = load_bundle(run / "bundle").manifest.metrics["history"]
    assert [e["epoch"] for e in history["classifier"]] == [0]  # not retrained
    assert [e["epoch"] for e in history["shield"]] == [0, 1]


def test_shields_from_starts_at_another_runs_trained_shields(tiny_run, tmp_path, kermany_dir):
    from training.runs import load_checkpoint

    out = tmp_path / "further"
    # lr 0: the Shields cannot move, so the result must hold exactly the source run's classifier and Shields
    assert main(["--preset", "tiny", "--data-dir", str(kermany_dir), "--out", str(out), "--shields-from",
                 str(tiny_run), "--set", "shield_lr=0", "--set", "attack_bpda=diffjpeg", "--skip-eval"]) == 0
    source, result = load_checkpoint(tiny_run)["model"], load_checkpoint(out)["model"]
    assert source.keys() == result.keys()
    assert all(torch.equal(source[k], result[k]) for k in source)
    history = load_bundle(out / "bundle").manifest.metrics["history"]
    assert len(history["initial_shields"]) == 1 and len(history["shield"]) == 1
    assert "classifier and Shields taken from" in (out / "train.log").read_text()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((tiny_run / "config.json").read_text().replace(
        '"shield_epochs": 1', '"shield_epochs": 3'))
    (unfinished / "checkpoint.pt").write_bytes((tiny_run / "checkpoint.pt").read_bytes())
    with pytest.raises(SystemExit, match="unfinished Shields"):
        main(["--preset", "tiny", "--data-dir", str(kermany_dir), "--out", str(tmp_path / "x"), "--shields-from",
              str(unfinished), "--skip-eval"])


def test_presets_load_and_overrides_apply():
    for path in PRESETS_DIR.glob("*.json"):
        assert isinstance(load_config(path.stem), TrainConfig)
    cfg = load_config("cxr-paper", {"taps": "[1, 4]", "shield_epochs": "3"})
    assert cfg.backbone == "resnet50" and cfg.image_size == 224 and cfg.taps == (1, 4) and cfg.shield_epochs == 3
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config("cxr-cpu", {"epochs": 3})
    with pytest.raises(FileNotFoundError, match="known presets"):
        load_config("nope")


def test_epsilon_curriculum_goes_from_1_to_16_over_256():
    cfg = TrainConfig(curriculum_epochs=25)
    assert cfg.eps_at(0) == pytest.approx(1 / 256)
    assert cfg.eps_at(24) == pytest.approx(16 / 256) and cfg.eps_at(40) == pytest.approx(16 / 256)
    assert all(cfg.eps_at(e) < cfg.eps_at(e + 1) for e in range(24))


def test_paper_preset_runs_at_tiny_size(tmp_path, kermany_dir):
    """ResNet-50 paper preset, shrunk to a few 32 px images: the same code path a GPU run takes."""
    overrides = ["image_size=32", "limit_per_split=16", "clf_epochs=1", "shield_epochs=1", "clf_batch_size=8",
                 "shield_batch_size=8", "attack_steps=1", "eval_images=4", "eval_batch_size=4", "eval_steps=2",
                 "shield_width=8"]
    args = ["--preset", "cxr-paper", "--data-dir", str(kermany_dir), "--out", str(tmp_path)]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    manifest = load_bundle(tmp_path / "bundle").manifest
    assert manifest.architecture.backbone == "resnet50" and manifest.architecture.taps == (1, 4, 8, 14)


def test_ddp_ranks_end_with_identical_weights(tmp_path, kermany_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "training.train", "--preset", "tiny", "--data-dir", str(kermany_dir), "--out", str(tmp_path),
               "--skip-eval", "--save-rank-weights", "--set", "limit_per_split=64"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    assert "world size 2" in (tmp_path / "train.log").read_text()
    assert load_bundle(tmp_path / "bundle").manifest.name == "aegis-tiny"


def test_briefly_trained_shield_separates_clean_from_attacked(small_net, xray_data, tmp_path):
    """Adversarial training of the Shields on 600 real images, then clean vs PGD on 96 unseen ones (5 epochs: with
    3 the AUROC sat at the bar and moved across it with the thread count)."""

    from training.attacks import Objective, PGDConfig, pgd
    from training.data import Split
    from training.distributed import SINGLE_CPU
    from training.inference import predict
    from training.metrics import auroc, routed_scores
    from training.shields import train_shields

    x_train, y_train, x_test, y_test = xray_data
    net = copy.deepcopy(small_net)
    to_split = lambda x, y: Split((x.permute(0, 2, 3, 1) * 255).round().byte().numpy(), y.numpy())  # noqa: E731
    cfg = TrainConfig(shield_epochs=5, curriculum_epochs=2, eps_start=8 / 256, shield_batch_size=64,
                      attack_steps=3, shield_lr=3e-3)
    history = {"classifier": [], "shield": []}
    train_shields(cfg, net, {"train": to_split(x_train, y_train)}, JpegCushion(), SINGLE_CPU,
                  tmp_path, None, history)
    net.eval()
    cushion = JpegCushion()
    logits, shields = predict(net, x_test, cushion)
    zero = np.zeros(2)
    clean_scores = routed_scores(shields, logits.argmax(1), zero)
    target = 1 - y_test
    adv = pgd(net, x_test, target, Objective(), PGDConfig(eps=16 / 256, steps=10), cushion=cushion).x_adv
    adv_logits, adv_shields = predict(net, adv, cushion)
    reached = adv_logits.argmax(1) == target.numpy()
    adv_scores = routed_scores(adv_shields, target.numpy(), zero)[reached]
    assert reached.mean() > 0.5
    assert auroc(clean_scores, adv_scores) > 0.75
    assert history["shield"][-1]["adv_reject"] > 0.5


def test_adversarial_batch_replaces_its_share_with_in_budget_images_the_classifier_gets_wrong(small_net, xray_data):
    from training.classifier import adversarial_batch

    x, y = xray_data[0][:16], xray_data[1][:16]
    cfg = TrainConfig(clf_adv_eps=16 / 256, clf_adv_steps=5, clf_adv_fraction=0.5)
    model = small_net.classifier.train()
    mixed = adversarial_batch(cfg, model, x, y)
    assert model.training  # the attack leaves the training mode as it found it
    assert torch.equal(mixed[8:], x[8:])  # the clean half is untouched
    assert (mixed[:8] - x[:8]).abs().max() <= 16 / 256 + 1e-6
    assert torch.equal(torch.round(mixed[:8] * 255), mixed[:8] * 255)  # uint8 levels
    with torch.no_grad():
        clean_wrong = (model.eval()(x[:8]).argmax(1) != y[:8]).sum()
        adv_wrong = (model(mixed[:8]).argmax(1) != y[:8]).sum()
    assert adv_wrong > clean_wrong


def test_a_run_folder_gives_back_its_trained_classifier(tiny_run):
    from training.runs import load_checkpoint, load_trained_classifier

    classifier = load_trained_classifier(tiny_run)
    saved = load_checkpoint(tiny_run)["model"]
    assert not classifier.training
    for name, tensor in classifier.state_dict().items():
        assert torch.equal(tensor, saved[f"classifier.{name}"]), name
    assert classifier(torch.rand(3, 1, 32, 32)).shape == (3, 2)


def test_a_run_whose_classifier_is_unfinished_is_refused(tiny_run, tmp_path):
    import shutil

    from training.runs import load_finished_classifier

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(tiny_run / "checkpoint.pt", unfinished / "checkpoint.pt")
    config = json.loads((tiny_run / "config.json").read_text())
    config["clf_epochs"] += 5  # the checkpoint now holds fewer classifier epochs than its run planned
    (unfinished / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="unfinished classifier"):
        load_finished_classifier(unfinished)
    cfg, weights, history = load_finished_classifier(tiny_run)
    assert len(history) == cfg.clf_epochs and all(not k.startswith("classifier.") for k in weights)


def test_the_shield_training_attacker_objective_is_chosen_by_config():
    from training.attacks import Objective, RejectClassObjective, ShieldOnlyObjective, WhiteBoxObjective
    from training.shields import training_objectives

    [wb] = training_objectives(TrainConfig(), 2)
    assert isinstance(wb, WhiteBoxObjective)
    assert [type(o) for o in training_objectives(TrainConfig(attack_objective="shield"), 2)] == [ShieldOnlyObjective]
    n1, ce = training_objectives(TrainConfig(attack_objective="n1+ce"), 3)
    assert isinstance(n1, RejectClassObjective) and torch.equal(n1.thresholds, torch.zeros(3))
    assert type(ce) is Objective  # conventional: the classifier's CE, blind to the Shields
    for bogus in ("bogus", "n1+bogus"):
        with pytest.raises(ValueError, match="attack_objective"):
            TrainConfig(attack_objective=bogus)


def _training_attacker_calls(small_net, xray_data, tmp_path, monkeypatch, cfg, record) -> list:
    """Train Shields one epoch (4 batches of 32 images) with `cfg`, recording `record(objective, config, surrogate)`
    for every call of the training attacker; each attack must stay inside its budget."""

    import training.shields as shields_module
    from models.cushion import parse_cushion
    from training.data import Split
    from training.distributed import SINGLE_CPU
    from training.shields import train_shields

    seen, real_pgd = [], shields_module.pgd

    def recording_pgd(net, x, target, objective, config, surrogate=None, **kwargs):
        seen.append(record(objective, config, surrogate))
        result = real_pgd(net, x, target, objective, config, surrogate=surrogate, **kwargs)
        assert (result.x_adv - x).abs().max() <= config.eps + 1e-6
        return result

    monkeypatch.setattr(shields_module, "pgd", recording_pgd)
    x, y = xray_data[0][:128], xray_data[1][:128]
    split = Split((x.permute(0, 2, 3, 1) * 255).round().byte().numpy(), y.numpy())
    train_shields(cfg, copy.deepcopy(small_net), {"train": split}, parse_cushion(cfg.cushion),
                  SINGLE_CPU, tmp_path, None, {"classifier": [], "shield": []})
    return seen


def test_the_mixed_training_attacker_alternates_identity_and_differentiable_jpeg_bpda(small_net, xray_data, tmp_path,
                                                                                     monkeypatch):
    from training.attacks import DiffJpeg

    cfg = TrainConfig(shield_epochs=1, shield_batch_size=32, attack_steps=1, attack_bpda="mixed",
                      cushion={"kind": "jpeg", "quality": 60})
    seen = _training_attacker_calls(small_net, xray_data, tmp_path, monkeypatch, cfg,
                                    lambda objective, config, surrogate: surrogate)
    assert len(seen) == 4
    assert seen[0] is None and seen[2] is None
    assert all(isinstance(s, DiffJpeg) and s.quality == 60 for s in seen[1::2])
    with pytest.raises(ValueError, match="JPEG Cushion"):
        TrainConfig(attack_bpda="diffjpeg", cushion={"kind": "bitdepth", "bits": 5})
    with pytest.raises(ValueError, match="attack_bpda"):
        TrainConfig(attack_bpda="bogus")


def test_training_attacker_alternates_its_objectives_with_each_bpda_backward(small_net, xray_data, tmp_path,
                                                                            monkeypatch):
    """attack_objective=n1+ce: the (N+1)-class attacker and the conventional one batch by batch, each with both
    backward passes of attack_bpda=mixed."""
    from training.attacks import Objective, RejectClassObjective

    cfg = TrainConfig(shield_epochs=1, shield_batch_size=32, attack_steps=1, attack_bpda="mixed",
                      attack_objective="n1+ce")
    seen = _training_attacker_calls(small_net, xray_data, tmp_path, monkeypatch, cfg,
                                    lambda objective, config, surrogate: (type(objective), surrogate is not None))
    assert seen == [(RejectClassObjective, False), (Objective, False), (RejectClassObjective, True), (Objective, True)]


def test_smoothed_training_attacker_covers_every_combination_with_the_bpda_backward(small_net, xray_data, tmp_path,
                                                                                   monkeypatch):
    """attack_smoothing=mixed: the transfer attack's DI + TI gradient on every other pair of batches, so with
    attack_bpda=mixed the four batches see each (backward, gradient) pair once; unknown values are refused."""
    cfg = TrainConfig(shield_epochs=1, shield_batch_size=32, attack_steps=1, attack_bpda="mixed",
                      attack_smoothing="mixed")
    seen = _training_attacker_calls(
        small_net, xray_data, tmp_path, monkeypatch, cfg,
        lambda objective, config, surrogate: (surrogate is not None, config.gradient_filter is not None,
                                              config.transform is not None))
    assert seen == [(False, False, False), (True, False, False), (False, True, True), (True, True, True)]
    with pytest.raises(ValueError, match="attack_smoothing"):
        TrainConfig(attack_smoothing="always")


@pytest.mark.parametrize("field, value", [("attack_direction", "Sum"), ("attack_bpda", "jpeg"),
                                          ("attack_smoothing", "yes"), ("dataset", "chexpert")])
def test_train_config_refuses_a_value_outside_its_choices(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be one of"):
        TrainConfig(**{field: value})


def test_train_config_refuses_an_unknown_attack_objective():
    with pytest.raises(ValueError, match="attack_objective must be one of"):
        TrainConfig(attack_objective="n1+cw")
    assert TrainConfig(attack_objective="n1+ce").attack_objective == "n1+ce"


def test_trades_and_mart_losses_match_their_formulas_written_out():
    from training.classifier import mart_loss, trades_loss

    clean = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    adv = torch.tensor([[0.0, 1.0], [0.4, 0.6]])
    y = torch.tensor([0, 1])
    p, q = clean.softmax(1).numpy(), adv.softmax(1).numpy()
    kl = (p * np.log(p / q)).sum(1)
    ce_clean = -np.log(p[[0, 1], [0, 1]])
    ce_adv = -np.log(q[[0, 1], [0, 1]])
    wrong = q[[0, 1], [1, 0]]  # binary: the one wrong class
    np.testing.assert_allclose(trades_loss(clean, adv, y, 6.0).numpy(), ce_clean + 6.0 * kl, rtol=1e-5)
    expected_mart = ce_adv - np.log(1 - wrong) + 6.0 * kl * (1 - p[[0, 1], [0, 1]])
    np.testing.assert_allclose(mart_loss(clean, adv, y, 6.0).numpy(), expected_mart, rtol=1e-5)
    assert trades_loss(clean, clean, y, 6.0).allclose(F.cross_entropy(clean, y, reduction="none"))


def test_the_trades_attacker_moves_the_prediction_further_than_random_noise_of_the_same_budget(small_net, xray_data):
    from training.attacks import DivergenceObjective
    from training.classifier import adversarial_batch

    x, y = xray_data[0][:16], xray_data[1][:16]
    cfg = TrainConfig(clf_adv_eps=8 / 256, clf_adv_steps=5, clf_objective="trades")
    model = small_net.classifier.eval()
    with torch.no_grad():
        clean_probs = model(x).softmax(1)
    x_adv = adversarial_batch(cfg, model, x, y, DivergenceObjective(clean_probs=clean_probs), fraction=1.0)
    assert (x_adv - x).abs().max() <= 8 / 256 + 1e-6
    noisy = (x + (torch.randint(0, 2, x.shape) * 2 - 1) * 8 / 256).clamp(0, 1)
    with torch.no_grad():
        def divergence(images):
            return F.kl_div(model(images).log_softmax(1), clean_probs, reduction="none").sum(1).mean()
        assert divergence(x_adv) > 2 * divergence(noisy)


@pytest.mark.parametrize("objective", ["trades", "mart"])
def test_a_robust_classifier_objective_trains_and_lowers_its_loss(objective, small_net, xray_data):
    from training.classifier import classifier_loss

    chosen = torch.randperm(len(xray_data[1]), generator=torch.Generator().manual_seed(0))[:32]  # both classes
    x, y = xray_data[0][chosen], xray_data[1][chosen]
    cfg = TrainConfig(clf_adv_eps=8 / 256, clf_adv_steps=3, clf_objective=objective)
    model = copy.deepcopy(small_net.classifier).train()  # the fixture is shared: train a copy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005)
    weight = torch.ones(2)
    losses = []
    for _ in range(4):
        torch.manual_seed(0)  # the same random starts, so the loss curve reflects the weights
        loss = classifier_loss(cfg, model, model, x, y, weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.training and np.isfinite(losses).all()
    assert losses[-1] < losses[0]


def test_a_robust_classifier_objective_needs_an_attack_budget():
    with pytest.raises(ValueError, match="clf_adv_eps > 0"):
        TrainConfig(clf_objective="trades")
    with pytest.raises(ValueError, match="TrainConfig.clf_objective must be one of"):
        TrainConfig(clf_objective="TRADES", clf_adv_eps=8 / 256)


def test_uniform_budgets_cover_every_grey_level_after_the_ramp_and_leave_the_curriculum_alone():
    from training.shields import batch_eps

    curriculum = TrainConfig(curriculum_epochs=5)
    uniform = TrainConfig(curriculum_epochs=5, eps_schedule="uniform")
    generator = torch.Generator().manual_seed(0)
    for epoch in range(4):  # the ramp is the same for both
        assert batch_eps(uniform, epoch, generator) == batch_eps(curriculum, epoch, generator) == uniform.eps_at(epoch)
    assert {batch_eps(curriculum, 7, generator) for _ in range(50)} == {16 / 256}
    drawn = [batch_eps(uniform, 7, generator) for _ in range(2000)]
    assert set(drawn) == {level / 256 for level in range(1, 17)}  # every grey level 1..16, nothing else
    counts = np.bincount([round(d * 256) for d in drawn])[1:]
    assert counts.min() > 0.5 * counts.mean()  # roughly uniform
    with pytest.raises(ValueError, match="eps_schedule must be one of"):
        TrainConfig(eps_schedule="random")


def test_shared_trunk_shields_train_through_the_same_loop(small_net, xray_data):
    from training.data import Split
    from training.distributed import SINGLE_CPU
    from training.shields import train_shields

    net = build_aegis("resnet18", 2, 1, (32, 32), shield_width=16, shield_kind="shared_trunk")
    net.classifier.load_state_dict(small_net.classifier.state_dict())
    x, y = xray_data[0][:64], xray_data[1][:64]
    split = Split((x * 255).round().byte().permute(0, 2, 3, 1).numpy(), y.numpy())
    cfg = TrainConfig(shield_epochs=2, curriculum_epochs=1, attack_steps=2, shield_batch_size=32,
                      shield_kind="shared_trunk", eps_schedule="uniform", attack_objective="n1")
    before = [p.clone() for p in net.shields.parameters()]
    history = {"classifier": [], "shield": []}
    with tempfile.TemporaryDirectory() as tmp:
        train_shields(cfg, net, {"train": split}, JpegCushion(), SINGLE_CPU, Path(tmp), None, history)
    assert len(history["shield"]) == 2 and all(np.isfinite(e["loss"]) for e in history["shield"])
    assert all(not torch.equal(a, b) for a, b in zip(before, net.shields.parameters()))  # trunk and both heads learn


def test_right_or_rejected_is_the_log_probability_of_the_two_good_outcomes_written_out():
    from training.joint import right_or_rejected

    logits = torch.tensor([[2.0, 0.5], [0.1, 1.5]])
    shields = torch.tensor([[0.7, -3.0], [0.2, -1.2]])  # image 0: class 0 accepted; image 1: class 1 rejected
    y = torch.tensor([1, 0])
    z, s = logits.numpy(), shields.numpy()
    k = z.argmax(1)
    view = np.c_[z, z.max(1) + (0.0 - s[[0, 1], k])]  # the rejected logit at thresholds 0
    p = np.exp(view) / np.exp(view).sum(1, keepdims=True)
    expected = np.log(p[[0, 1], [1, 0]] + p[:, 2])
    np.testing.assert_allclose(right_or_rejected(logits, shields, y).numpy(), expected, rtol=1e-5)
    view = np.c_[z, z.max(1) + (2.5 - s[[0, 1], k])]  # every threshold at 2.5: image 0 is now rejected too
    p = np.exp(view) / np.exp(view).sum(1, keepdims=True)
    np.testing.assert_allclose(right_or_rejected(logits, shields, y, 2.5).numpy(),
                               np.log(p[[0, 1], [1, 0]] + p[:, 2]), rtol=1e-5)


def test_joint_stage_moves_classifier_and_shields_and_keeps_batchnorm_statistics(small_net, xray_data):
    from training.data import Split
    from training.distributed import SINGLE_CPU
    from training.joint import train_jointly

    net = copy.deepcopy(small_net)
    chosen = torch.randperm(len(xray_data[1]), generator=torch.Generator().manual_seed(1))[:64]
    x, y = xray_data[0][chosen], xray_data[1][chosen]
    split = Split((x * 255).round().byte().permute(0, 2, 3, 1).numpy(), y.numpy())
    cfg = TrainConfig(joint_epochs=1, attack_steps=2, shield_batch_size=32, attack_objective="n1")
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    history = {"classifier": [], "shield": []}
    with tempfile.TemporaryDirectory() as tmp:
        train_jointly(cfg, net, {"train": split}, JpegCushion(), SINGLE_CPU, Path(tmp), None, history)
        assert torch.load(Path(tmp) / "checkpoint.pt", weights_only=False)["stage"] == "joint"
    entry, = history["joint"]
    assert np.isfinite(entry["loss"]) and 0 <= entry["adv_right_or_rejected"] <= 1
    after = net.state_dict()
    assert not torch.equal(after["classifier.head.2.weight"], weights["classifier.head.2.weight"])
    assert not torch.equal(after["shields.0.head.2.weight"], weights["shields.0.head.2.weight"])
    for name in after:  # frozen BatchNorm: its running statistics are the classifier stage's
        if "running_" in name:
            assert torch.equal(after[name], weights[name]), name


def test_joint_stage_with_margin_shields_trains_the_classifier_to_reject_by_confidence(xray_data):
    """Margin Shields have no weights: the joint stage moves the classifier alone, and its attacker and loss put the
    accept/reject boundary at `operating_logit`, a log-odds (a learned-Shield config refuses the setting)."""
    from training.data import Split
    from training.distributed import SINGLE_CPU
    from training.joint import train_jointly
    from training.shields import training_objectives

    torch.manual_seed(0)
    net = build_aegis("resnet18", 2, 1, (32, 32), shield_kind="margin").eval()
    x, y = xray_data[0][:32], xray_data[1][:32]
    split = Split((x * 255).round().byte().permute(0, 2, 3, 1).numpy(), y.numpy())
    cfg = TrainConfig(joint_epochs=1, attack_steps=2, shield_batch_size=32, attack_objective="n1",
                      shield_kind="margin", operating_logit=2.2)
    assert torch.equal(training_objectives(cfg, 2)[0].thresholds, torch.full((2,), 2.2))
    head = net.classifier.head[-1].weight.clone()
    history = {"classifier": [], "shield": []}
    with tempfile.TemporaryDirectory() as tmp:
        train_jointly(cfg, net, {"train": split}, JpegCushion(), SINGLE_CPU, Path(tmp), None, history)
    assert np.isfinite(history["joint"][0]["loss"]) and not torch.equal(net.classifier.head[-1].weight, head)
    with pytest.raises(ValueError, match="operating_logit"):
        TrainConfig(operating_logit=2.2)


def test_the_classifier_kept_is_the_weight_average_when_clf_ema_is_set(tmp_path, kermany_dir):
    """With a decay of 1 - 1e-7 the average stays at the weights after the first step (torch's AveragedModel starts
    there): the classifier kept is then nearer the untrained network than the same run's without averaging, which
    took every step."""
    from training.data import load_data
    from training.runs import load_checkpoint, network_for

    def classifier_after(ema: float) -> dict:
        out = tmp_path / f"ema-{ema}"
        assert main(["--preset", "tiny", "--data-dir", str(kermany_dir), "--out", str(out), "--set", f"clf_ema={ema}",
                     "--set", "shield_epochs=0", "--skip-eval"]) == 0
        return {k.removeprefix("classifier."): v for k, v in load_checkpoint(out)["model"].items()
                if k.startswith("classifier.")}

    cfg = load_config("tiny", {"data_dir": str(kermany_dir)})
    torch.manual_seed(cfg.seed)
    load_data(cfg)  # as training.train.main does before it builds the network
    untrained = network_for(cfg).classifier.state_dict()
    averaged, trained = classifier_after(1 - 1e-7), classifier_after(0)
    weights = [k for k, v in untrained.items() if k.endswith("weight") and v.dim() > 1]

    def distance(state: dict) -> float:
        return sum(float((state[k] - untrained[k]).norm()) for k in weights)

    assert 0 < distance(averaged) < 0.7 * distance(trained)
