"""Stage 3 of training (optional, `joint_epochs` > 0): classifier and Shields fine-tuned together against the
(N+1)-class attacker, with "rejected" as the (N+1)-th class.

The attacker is the Shield stage's (`training.shields.training_objectives` / `training_surrogates` / `batch_eps`: the
configured objective, BPDA backward and budgets), but it now attacks a model whose classifier moves too. The
defender's loss per batch:

    CE(z(C(x)), y)                         clean accuracy held by a clean term (class-weighted, as in stage 1)
  + BCE(S^y(C(x)), 1)                      clean images accepted by their class's Shield
  + w * -log(p_y(C(x')) + p_reject(C(x')))  each attack either classified correctly or rejected

with p the softmax of the (N+1)-class view of the decision (`reject_as_class`, every threshold at the Shields'
operating logit: 0 for learned Shields; for margin Shields `operating_logit`, a log-odds the clean term
BCE(S^y - operating_logit, 1) lifts clean images above). With margin Shields this stage is rejection-aware adversarial
training of the classifier alone: an attack must end right or below the confidence boundary. The last term is what a defended classifier with a reject option must satisfy: for the decision to be
right, an adversarial image may be rejected or correctly diagnosed, never accepted with a wrong diagnosis
(Tramèr 2022's robust classifier-with-rejection view; Pang et al. 2022 train a rejection head on the same
principle). BatchNorm statistics stay frozen (the model runs in eval mode while its weights learn), so the Shields'
features do not shift under the adversarial batches.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from models.cushion import CushionBase
from models.networks import AegisNet
from training.attacks import exact_cushion, pgd, reject_as_class
from training.config import TrainConfig
from training.data import Split, TrainImages
from training.distributed import Worker, data_loader, progress
from training.runs import resume_epoch, save_checkpoint
from training.shields import batch_eps, training_attacks, training_objectives, training_surrogates

log = logging.getLogger("aegis.train")


def right_or_rejected(logits: Tensor, shield_logits: Tensor, y: Tensor, threshold: float = 0.0) -> Tensor:
    """Per image, log(p_y + p_reject) in the (N+1)-class view of the decision, every class's threshold `threshold`."""
    log_p = reject_as_class(logits, shield_logits, torch.full((logits.shape[1],), threshold)).log_softmax(1)
    return torch.logsumexp(torch.stack([log_p.gather(1, y[:, None]).squeeze(1), log_p[:, -1]]), 0)


def train_jointly(cfg: TrainConfig, net: AegisNet, splits: dict[str, Split], cushion: CushionBase, worker: Worker,
                  out: Path, checkpoint: dict | None, history: dict[str, list]) -> None:
    torch.manual_seed(cfg.seed + 3)
    for p in net.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.joint_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.joint_epochs, 1))
    start = resume_epoch(checkpoint, "joint", optimizer, scheduler)
    num_classes = net.classifier.head[-1].out_features
    counts = np.bincount(splits["train"].labels, minlength=num_classes)
    class_weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32,
                                device=worker.device)
    objectives, surrogates = training_objectives(cfg, num_classes), training_surrogates(cfg)
    trainable = DistributedDataParallel(net) if worker.world > 1 else net
    dataset = TrainImages(splits["train"], cushion, 0.0, cfg.seed + 3000 + worker.rank)
    targets = torch.Generator().manual_seed(cfg.seed + 3 + worker.rank)
    budgets = torch.Generator().manual_seed(cfg.seed + 4)
    history.setdefault("joint", [])
    for epoch in range(start, cfg.joint_epochs):
        net.eval()  # weights learn, BatchNorm statistics stay those of the classifier stage
        stats = {"loss": 0.0, "clean_correct": 0.0, "clean_accept": 0.0, "adv_right_or_rejected": 0.0,
                 "adv_label": 0.0, "n": 0}
        began = time.time()
        for batch, (x, y) in enumerate(progress(data_loader(dataset, cfg.shield_batch_size, worker, epoch, cfg.seed),
                                                worker, f"joint {epoch}")):
            x, y = x.to(worker.device), y.to(worker.device)
            target = (y + torch.randint(1, num_classes, y.shape, generator=targets).to(worker.device)) % num_classes
            turn, objective = divmod(batch, len(objectives))
            attacks = training_attacks(cfg, batch_eps(cfg, cfg.curriculum_epochs + epoch, budgets))
            adv = pgd(net, x, target, objectives[objective], attacks[turn // len(surrogates) % len(attacks)],
                      cushion=cushion, surrogate=surrogates[turn % len(surrogates)])
            logits, shield_logits = trainable(exact_cushion(torch.cat([x, adv.x_adv]), cushion))
            n = len(y)
            clean_ce = F.cross_entropy(logits[:n], y, weight=class_weight, label_smoothing=0.05)
            clean_shield = shield_logits[:n].gather(1, y[:, None]).squeeze(1) - cfg.operating_logit
            accept = F.binary_cross_entropy_with_logits(clean_shield, torch.ones_like(clean_shield))
            robust = right_or_rejected(logits[n:], shield_logits[n:], y, cfg.operating_logit)
            loss = clean_ce + accept - cfg.joint_adv_weight * robust.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                adv_pred = logits[n:].argmax(1)
                adv_accepted = shield_logits[n:].gather(1, adv_pred[:, None]).squeeze(1) >= cfg.operating_logit
                stats["loss"] += loss.item() * n
                stats["clean_correct"] += float((logits[:n].argmax(1) == y).sum())
                stats["clean_accept"] += float((clean_shield >= 0).sum())
                stats["adv_right_or_rejected"] += float(((adv_pred == y) | ~adv_accepted).sum())
                stats["adv_label"] += float((adv_pred == target).sum())
                stats["n"] += n
        scheduler.step()
        n = max(stats.pop("n"), 1)
        entry = {"epoch": epoch, **{k: v / n for k, v in stats.items()}, "seconds": round(time.time() - began, 1)}
        history["joint"].append(entry)
        log.info("joint epoch %d/%d: loss %.4f, clean correct %.3f, clean accepted %.3f, attacks right or rejected "
                 "%.3f, attacks reaching target %.3f, %.0fs", epoch + 1, cfg.joint_epochs, entry["loss"],
                 entry["clean_correct"], entry["clean_accept"], entry["adv_right_or_rejected"], entry["adv_label"],
                 entry["seconds"])
        if worker.main:
            save_checkpoint(out, "joint", epoch, net, optimizer, scheduler, history)
    for p in net.parameters():
        p.requires_grad_(False)
