"""Run folders: what a training run leaves on disk and how another run, the audit or a resume reads it back.

    <out>/config.json    the resolved TrainConfig          <out>/command.txt   the command that started the run
    <out>/train.log      progress                          <out>/checkpoint.pt the last finished epoch (atomic)
    <out>/bundle/        the exported bundle
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

from models.networks import AegisNet, build_aegis
from training.config import TrainConfig, load_config
from training.data import CLASSES


def network_for(cfg: TrainConfig, pretrained: str | None = None) -> AegisNet:
    """The untrained AegisNet a config describes (`pretrained`: a local torchvision state dict for the backbone)."""
    return build_aegis(cfg.backbone, len(CLASSES[cfg.dataset]), cfg.channels, (cfg.image_size, cfg.image_size),
                       cfg.taps, cfg.shield_width, pretrained, shield_kind=cfg.shield_kind)


def start_run(out: Path, cfg: TrainConfig, argv: list[str], main: bool) -> None:
    """Create the run folder, route logging to stderr (+ train.log on rank 0), record config and command."""
    out.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if main:
        handlers.append(logging.FileHandler(out / "train.log"))
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out / "command.txt").write_text(shlex.join(["python", "-m", "training.train", *argv]) + "\n")


def save_checkpoint(out: Path, stage: str, epoch: int, net: AegisNet, optimizer, scheduler, history: dict,
                    averaged: nn.Module | None = None) -> None:
    """`averaged`: the stage's weight average (`torch.optim.swa_utils.AveragedModel`), kept to resume it."""
    state = {"stage": stage, "epoch": epoch, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "history": history}
    if averaged is not None:
        state["averaged"] = averaged.state_dict()
    torch.save(state, out / "checkpoint.tmp")
    os.replace(out / "checkpoint.tmp", out / "checkpoint.pt")  # atomic: a crash never leaves half a checkpoint


def load_checkpoint(out: Path) -> dict | None:
    path = out / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def resume_epoch(checkpoint: dict | None, stage: str, optimizer, scheduler) -> int:
    """The first epoch still to run in `stage`; restores the optimizer and scheduler when the checkpoint is of it."""
    if checkpoint is None or checkpoint["stage"] != stage:
        return 0
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    return checkpoint["epoch"] + 1


def load_finished_run(run_dir: Path, *, shields: bool = False) -> tuple[TrainConfig, dict]:
    """(config, checkpoint) of a run folder whose classifier stage (and with `shields`, its Shield stage) finished;
    an unfinished stage is refused (its weights are not the model its config describes)."""
    cfg = load_config(None, json.loads((run_dir / "config.json").read_text()))
    state = load_checkpoint(run_dir)
    history = {"classifier": [], "shield": []} if state is None else state["history"]
    if len(history["classifier"]) < cfg.clf_epochs:
        raise SystemExit(f"{run_dir} holds an unfinished classifier ({len(history['classifier'])} of "
                         f"{cfg.clf_epochs} epochs)")
    if shields and len(history["shield"]) < cfg.shield_epochs:
        raise SystemExit(f"{run_dir} holds unfinished Shields ({len(history['shield'])} of {cfg.shield_epochs} "
                         "epochs)")
    return cfg, state


def load_finished_classifier(run_dir: Path) -> tuple[TrainConfig, dict, list]:
    """(config, classifier weights, classifier history) of a run folder whose classifier stage finished."""
    cfg, state = load_finished_run(run_dir)
    weights = {k.removeprefix("classifier."): v for k, v in state["model"].items() if k.startswith("classifier.")}
    return cfg, weights, state["history"]["classifier"]


def load_trained_classifier(run_dir: Path) -> nn.Module:
    """The trained classifier of a run folder (its config.json + checkpoint.pt), e.g. a transfer attack's
    substitute trained with `--set backbone=vgg16 --set shield_epochs=0 --skip-eval`."""
    cfg, weights, _ = load_finished_classifier(run_dir)
    net = network_for(cfg)
    net.classifier.load_state_dict(weights)
    return net.classifier.eval()
