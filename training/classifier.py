"""Stage 1 of training: the classifier, standard or adversarially trained (Madry et al.'s PGD-AT, TRADES or MART),
with the Cushion as augmentation."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models.cushion import CushionBase
from models.networks import AegisNet
from training.attacks import DivergenceObjective, Objective, PGDConfig, pgd
from training.config import TrainConfig
from training.data import Split, TrainImages
from training.distributed import Worker, data_loader, progress
from training.inference import predict
from training.runs import resume_epoch, save_checkpoint

log = logging.getLogger("aegis.train")


def train_classifier(cfg: TrainConfig, net: AegisNet, splits: dict[str, Split], cushion: CushionBase, worker: Worker,
                     out: Path, checkpoint: dict | None, history: dict[str, list]) -> None:
    model = net.classifier
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.clf_lr, weight_decay=cfg.clf_weight_decay)
    steps_per_epoch = max(1, len(splits["train"].labels) // (cfg.clf_batch_size * worker.world))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.clf_lr, total_steps=cfg.clf_epochs * steps_per_epoch
                                                    + 1, pct_start=0.15)
    start = resume_epoch(checkpoint, "classifier", optimizer, scheduler)
    averaged = None
    if cfg.clf_ema:
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.clf_ema), use_buffers=True)
        if start:
            averaged.load_state_dict(checkpoint["averaged"])
    counts = np.bincount(splits["train"].labels, minlength=net.classifier.head[-1].out_features)
    class_weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32,
                                device=worker.device)  # inverse frequency: ~73% of Kermany train is PNEUMONIA
    trainable = DistributedDataParallel(model) if worker.world > 1 else model
    dataset = TrainImages(splits["train"], cushion, cfg.cushion_aug_prob, cfg.seed + worker.rank)
    for epoch in range(start, cfg.clf_epochs):
        model.train()
        total, seen, began = 0.0, 0, time.time()
        batches = data_loader(dataset, cfg.clf_batch_size, worker, epoch, cfg.seed)
        for x, y in progress(batches, worker, f"classifier {epoch}"):
            x, y = x.to(worker.device), y.to(worker.device)
            loss = classifier_loss(cfg, model, trainable, x, y, class_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)
            total, seen = total + loss.item() * len(y), seen + len(y)
        if worker.world > 1:  # BatchNorm running statistics are per rank: adopt rank 0's so every rank holds one model
            for buffer in [*model.buffers(), *(averaged.buffers() if averaged is not None else ())]:
                dist.broadcast(buffer, src=0)
        if averaged is not None and epoch == cfg.clf_epochs - 1:
            model.load_state_dict(averaged.module.state_dict())  # the average is the classifier kept
        evaluated = model if averaged is None else averaged.module
        evaluated.eval()
        val_logits, _ = predict(evaluated, splits["val"].tensor(), cushion, device=worker.device)
        acc = float((val_logits.argmax(1) == splits["val"].labels).mean())
        entry = {"epoch": epoch, "loss": total / max(seen, 1), "val_accuracy_cushion": acc,
                 "seconds": round(time.time() - began, 1)}
        history["classifier"].append(entry)
        log.info("classifier epoch %d/%d: loss %.4f, val accuracy (with Cushion) %.4f, %.0fs", epoch + 1,
                 cfg.clf_epochs, entry["loss"], acc, entry["seconds"])
        if worker.main:
            save_checkpoint(out, "classifier", epoch, net, optimizer, scheduler, history, averaged)


def classifier_loss(cfg: TrainConfig, model: nn.Module, trainable: nn.Module, x: Tensor, y: Tensor,
                    class_weight: Tensor) -> Tensor:
    """The batch loss of `cfg.clf_objective` (class-weighted; `trainable` is `model`, DDP-wrapped when distributed).

    pgd_at: CE on the batch with its first `clf_adv_fraction` replaced by PGD images (label smoothing 0.05).
    trades (Zhang et al., ICML 2019): CE(clean) + beta * KL(p_clean || p_adv), x_adv maximising the KL.
    mart (Wang et al., ICLR 2020): BCE(adv) + beta * KL(p_clean || p_adv) * (1 - p_clean[y]), where BCE adds
    -log(1 - max wrong-class probability) to the adversarial CE, x_adv from PGD on the CE.
    """
    if cfg.clf_adv_eps <= 0:
        return F.cross_entropy(trainable(x), y, weight=class_weight, label_smoothing=0.05)
    if cfg.clf_objective == "pgd_at":
        return F.cross_entropy(trainable(adversarial_batch(cfg, model, x, y)), y, weight=class_weight,
                               label_smoothing=0.05)
    n = len(y)
    objective = DivergenceObjective(clean_probs=_clean_probs(model, x)) if cfg.clf_objective == "trades" else None
    x_adv = adversarial_batch(cfg, model, x, y, objective, fraction=1.0)
    logits = trainable(torch.cat([x, x_adv]))  # one forward: BatchNorm sees clean and adversarial images together
    loss = trades_loss if cfg.clf_objective == "trades" else mart_loss
    return (class_weight[y] / class_weight[y].mean() * loss(logits[:n], logits[n:], y, cfg.clf_beta)).mean()


def _clean_probs(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    with torch.no_grad():
        probs = F.softmax(model.eval()(x), 1)
    model.train(was_training)
    return probs


def _kl(clean: Tensor, adv: Tensor) -> Tensor:
    """Per-example KL(softmax(clean) || softmax(adv))."""
    return F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="none").sum(1)


def trades_loss(clean: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """Per-example TRADES loss from clean and adversarial logits: CE(clean, y) + beta * KL(clean || adv)."""
    return F.cross_entropy(clean, y, reduction="none") + beta * _kl(clean, adv)


def mart_loss(clean: Tensor, adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """Per-example MART loss: CE(adv, y) - log(1 - max_{k != y} p_adv[k])
    + beta * KL(clean || adv) * (1 - p_clean[y])."""
    adv_probs = F.softmax(adv, 1)
    wrong = adv_probs.masked_fill(F.one_hot(y, adv.shape[1]).bool(), 0.0).max(1).values
    boosted_ce = F.cross_entropy(adv, y, reduction="none") - torch.log1p(-wrong.clamp(max=1 - 1e-6))
    true_prob = F.softmax(clean, 1).gather(1, y[:, None]).squeeze(1)
    return boosted_ce + beta * _kl(clean, adv) * (1 - true_prob)


def adversarial_batch(cfg: TrainConfig, model: nn.Module, x: Tensor, y: Tensor, objective: Objective | None = None,
                      fraction: float | None = None) -> Tensor:
    """Replace the first `fraction` (default `clf_adv_fraction`) of the batch by PGD-L∞ images (random start,
    `objective` — CE by default — towards the most likely wrong class, uint8-quantised) crafted against the current
    classifier."""
    n = int(round((cfg.clf_adv_fraction if fraction is None else fraction) * len(x)))
    if n == 0:
        return x
    with torch.no_grad():
        was_training = model.training
        logits = model.eval()(x[:n])
        model.train(was_training)
    target = logits.masked_fill(F.one_hot(y[:n], logits.shape[1]).bool(), float("-inf")).argmax(1)
    config = PGDConfig(eps=cfg.clf_adv_eps, steps=cfg.clf_adv_steps)
    x_adv = pgd(model, x[:n], target, objective or Objective(), config).x_adv
    return torch.cat([x_adv, x[n:]])
