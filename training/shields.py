"""Stage 2 of training: the Shields, adversarially trained in feature space against a white-box attacker that sees
them (paper Eq. 4), over the frozen classifier of stage 1."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from models.cushion import CushionBase, parse_cushion
from models.networks import AegisNet
from training.attacks import (DiffJpeg, Objective, PGDConfig, RejectClassObjective, ShieldOnlyObjective,
                              WhiteBoxObjective, exact_cushion, jpeg_quality, pgd, with_transfer_smoothing)
from training.config import TrainConfig
from training.data import Split, TrainImages
from training.distributed import Worker, data_loader, progress
from training.options import ObjectiveName
from training.runs import resume_epoch, save_checkpoint

log = logging.getLogger("aegis.train")


class ShieldTrainer(nn.Module):
    """Wraps the Shields for DDP: maps frozen-classifier taps to all K Shield logits."""

    def __init__(self, net: AegisNet):
        super().__init__()
        self.shields = net.shields
        self._net = [net]  # not a submodule: the classifier is frozen and stays out of DDP

    def forward(self, taps: list[Tensor], logits: Tensor) -> Tensor:
        return self._net[0].shield_logits(taps, logits)


def training_objectives(cfg: TrainConfig, num_classes: int) -> list[Objective]:
    """The objectives the training attacker cycles through, batch by batch (`attack_objective`, e.g. "n1+ce")."""
    build: dict[str, Callable[[], Objective]] = {
        "shield": ShieldOnlyObjective,
        "n1": lambda: RejectClassObjective(thresholds=torch.full((num_classes,), cfg.operating_logit)),
        "wb": lambda: WhiteBoxObjective(kappa=cfg.attack_kappa),
        "ce": Objective,  # the conventional attacker: the classifier's CE only, blind to the Shields
    }
    assert set(build) == set(get_args(ObjectiveName)), "one builder per objective name of training.options"
    return [build[name]() for name in cfg.attack_objective.split("+")]


def training_surrogates(cfg: TrainConfig) -> list[DiffJpeg | None]:
    """The BPDA backward passes the training attacker cycles through, batch by batch (None: identity)."""
    diffjpeg = DiffJpeg(jpeg_quality(parse_cushion(cfg.cushion))) if cfg.attack_bpda != "identity" else None
    return {"identity": [None], "diffjpeg": [diffjpeg], "mixed": [None, diffjpeg]}[cfg.attack_bpda]


def training_attacks(cfg: TrainConfig, eps: float) -> list[PGDConfig]:
    """The attack settings the training attacker cycles through (every combination with each BPDA backward)."""
    plain = PGDConfig(eps=eps, steps=cfg.attack_steps, step_size=cfg.attack_step_size, direction=cfg.attack_direction)
    if cfg.attack_smoothing == "none":
        return [plain]
    return [plain, with_transfer_smoothing(plain)]


def batch_eps(cfg: TrainConfig, epoch: int, generator: torch.Generator) -> float:
    """The training attacker's budget for one batch: the curriculum's (`cfg.eps_at`), or with
    `eps_schedule="uniform"`, once the ramp is over, a grey level drawn uniformly from eps_start..eps_end."""
    if cfg.eps_schedule == "curriculum" or epoch < cfg.curriculum_epochs - 1:
        return cfg.eps_at(epoch)
    low, high = round(cfg.eps_start * 256), round(cfg.eps_end * 256)
    return int(torch.randint(low, high + 1, (1,), generator=generator)) / 256


def train_shields(cfg: TrainConfig, net: AegisNet, splits: dict[str, Split], cushion: CushionBase, worker: Worker,
                  out: Path, checkpoint: dict | None, history: dict[str, list]) -> None:
    """Paper Eq. 4 with the gap closed: negatives are crafted by the WB objective towards the routed class.

    For an image of class y, the attacker picks a target t != y and minimises -S^t(f(C(x))) + J_cw(x, t) with PGD,
    BPDA through the real Cushion (identity backward, or a differentiable JPEG's: `attack_bpda`); S^y learns to accept C(x) and S^t to reject C(x_adv). The attacker always sees
    the current Shields (white-box adversarial training), with the epsilon curriculum of `TrainConfig.eps_at`.
    """
    torch.manual_seed(cfg.seed + 1)  # the same Shield run whether the classifier was trained here or loaded
    if not list(net.shields.parameters()):
        log.info("%s Shields have no weights: nothing to train", cfg.shield_kind)
        return
    for p in net.classifier.parameters():
        p.requires_grad_(False)
    net.classifier.eval()
    optimizer = torch.optim.Adam(net.shields.parameters(), lr=cfg.shield_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.shield_epochs, 1))
    start = resume_epoch(checkpoint, "shield", optimizer, scheduler)
    trainer = ShieldTrainer(net)
    trainable = DistributedDataParallel(trainer) if worker.world > 1 else trainer
    num_classes = net.classifier.head[-1].out_features
    objectives = training_objectives(cfg, num_classes)
    surrogates = training_surrogates(cfg)
    dataset = TrainImages(splits["train"], cushion, 0.0, cfg.seed + 1000 + worker.rank)
    generator = torch.Generator().manual_seed(cfg.seed + worker.rank)
    budgets = torch.Generator().manual_seed(cfg.seed + 2)  # its own stream: the curriculum's runs stay as they were
    for epoch in range(start, cfg.shield_epochs):
        eps = cfg.eps_at(epoch)
        stats = {"loss": 0.0, "clean_accept": 0.0, "adv_reject": 0.0, "adv_label": 0.0, "n": 0}
        began = time.time()
        batches = data_loader(dataset, cfg.shield_batch_size, worker, epoch, cfg.seed)
        for batch, (x, y) in enumerate(progress(batches, worker, f"shield {epoch}")):
            x, y = x.to(worker.device), y.to(worker.device)
            offset = torch.randint(1, num_classes, y.shape, generator=generator).to(worker.device)
            target = (y + offset) % num_classes  # any class but the true one
            # every combination of objective, BPDA backward and attack setting in turn; sees the current Shields
            turn, objective = divmod(batch, len(objectives))
            attacks = training_attacks(cfg, batch_eps(cfg, epoch, budgets))
            adv = pgd(net, x, target, objectives[objective], attacks[turn // len(surrogates) % len(attacks)],
                      cushion=cushion, surrogate=surrogates[turn % len(surrogates)])
            with torch.no_grad():
                clean_logits, clean_taps = net.classifier.forward_with_taps(exact_cushion(x, cushion))
                adv_logits, adv_taps = net.classifier.forward_with_taps(exact_cushion(adv.x_adv, cushion))
            both = [torch.cat(pair) for pair in zip(clean_taps, adv_taps)]
            shield_logits = trainable(both, torch.cat([clean_logits, adv_logits]))
            routed = torch.cat([y, target])  # clean images go to their class's Shield, attacks to the target's
            scores = shield_logits.gather(1, routed[:, None]).squeeze(1)
            is_clean = torch.cat([torch.ones_like(y), torch.zeros_like(y)]).float()
            loss = F.binary_cross_entropy_with_logits(scores, is_clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(y)
            stats["loss"] += loss.item() * n
            stats["clean_accept"] += float((scores[:n] > 0).float().sum())
            stats["adv_reject"] += float((scores[n:] < 0).float().sum())
            stats["adv_label"] += float((adv_logits.argmax(1) == target).float().sum())
            stats["n"] += n
        scheduler.step()
        n = max(stats.pop("n"), 1)
        entry = {"epoch": epoch, "eps": eps, **{k: v / n for k, v in stats.items()},
                 "seconds": round(time.time() - began, 1)}
        history["shield"].append(entry)
        log.info("shield epoch %d/%d: eps %.1f/256, loss %.4f, clean accepted %.3f, attacks rejected %.3f, "
                 "attacks reaching target %.3f, %.0fs", epoch + 1, cfg.shield_epochs, eps * 256, entry["loss"],
                 entry["clean_accept"], entry["adv_reject"], entry["adv_label"], entry["seconds"])
        if worker.main:
            save_checkpoint(out, "shield", epoch, net, optimizer, scheduler, history)
