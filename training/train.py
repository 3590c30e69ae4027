"""Train a defended Medical Aegis bundle: classifier -> adversarially trained Shields -> calibration -> evaluation
-> export (`models/bundle.py`).

Single process (the CPU preset that builds the embedded default bundle, ~1 hour on 2 cores):

    python -m training.train --preset cxr-cpu --out runs/cxr-cpu

Several processes or GPUs (DistributedDataParallel; gloo on CPU, nccl on GPU):

    torchrun --nproc_per_node 4 -m training.train --preset cxr-paper --out runs/cxr-paper

Any config field can be overridden: `--set shield_epochs=4 --set taps=[1,3]`. `--resume` continues from the last
completed epoch in `--out`. Progress goes to stderr and `<out>/train.log`; the resolved config to
`<out>/config.json`; the bundle to `<out>/bundle` (or `--bundle-dir`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2
from tqdm import tqdm

from models.cushion import parse_cushion
from models.imaging import InputSpec
from models.networks import AegisNet, build_aegis
from training.attacks import (DiffJpeg, Objective, PGDConfig, RejectClassObjective, ShieldOnlyObjective,
                              WhiteBoxObjective, exact_cushion, jpeg_quality, pgd, with_transfer_smoothing)
from training.config import TrainConfig, load_config
from training.data import CLASSES, fingerprint, load_images, load_records, split_validation

log = logging.getLogger("aegis.train")


# ----------------------------------------------------------------------------------------------------------- setup
@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(threads: int | None) -> Runtime:
    """Join the torchrun process group when launched by torchrun; pick the device once."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world, device)


def setup_logging(out: Path, main: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if main:
        handlers.append(logging.FileHandler(out / "train.log"))
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------------------------------------ data
@dataclass
class Split:
    images: np.ndarray  # uint8 N x H x W x C
    labels: np.ndarray  # int64 N

    def tensor(self) -> Tensor:
        """Float N x C x H x W in [0, 1] (not Cushioned)."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 255


class TrainImages(Dataset):
    """Augmented training images; each is Cushioned with probability `cushion_prob` (so the Cushion costs ~nothing)."""

    def __init__(self, split: Split, cushion, cushion_prob: float, seed: int):
        self.split, self.cushion, self.cushion_prob = split, cushion, cushion_prob
        size = split.images.shape[1:3]
        # Geometry and exposure jitter: the Kermany test folder differs from train in acquisition, not anatomy.
        self.augment = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05)),
            v2.ColorJitter(brightness=0.25, contrast=0.25),
        ])
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = self.augment(torch.from_numpy(self.split.images[i]).permute(2, 0, 1))
        if self.rng.random() < self.cushion_prob:
            image = torch.from_numpy(self.cushion(image.permute(1, 2, 0).numpy().copy())).permute(2, 0, 1)
        return image.float() / 255, int(self.split.labels[i])


def load_data(cfg: TrainConfig) -> tuple[dict[str, Split], dict]:
    spec = InputSpec(channels=cfg.channels, height=cfg.image_size, width=cfg.image_size)
    records = split_validation(load_records(cfg.dataset, cfg.resolved_data_dir), cfg.val_fraction, cfg.seed)
    splits, counts = {}, {}
    for name in ("train", "val", "test"):
        chosen = [r for r in records if r.split == name]
        if cfg.limit_per_split:
            rng = np.random.default_rng(cfg.seed)
            chosen = [chosen[i] for i in sorted(rng.permutation(len(chosen))[:cfg.limit_per_split])]
        splits[name] = Split(load_images(chosen, spec), np.array([r.label for r in chosen], dtype=np.int64))
        counts[name] = {c: int((splits[name].labels == k).sum()) for k, c in enumerate(CLASSES[cfg.dataset])}
    used = [r for r in records if r.split in ("train", "val", "test")]
    info = {"dataset": cfg.dataset, "path": str(cfg.resolved_data_dir), "fingerprint": fingerprint(used),
            "counts": counts, "validation": f"patient/cluster-disjoint {cfg.val_fraction:.0%} of train, seed {cfg.seed}"}
    return splits, info


def loader(dataset: Dataset, batch_size: int, rt: Runtime, epoch: int, seed: int) -> DataLoader:
    sampler = DistributedSampler(dataset, rt.world, rt.rank, shuffle=True, seed=seed) if rt.world > 1 else None
    if sampler is not None:
        sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=generator, drop_last=len(dataset) > batch_size * rt.world)


# ------------------------------------------------------------------------------------------------- checkpointing
def save_checkpoint(out: Path, stage: str, epoch: int, net: AegisNet, optimizer, scheduler, history: list) -> None:
    state = {"stage": stage, "epoch": epoch, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "history": history}
    torch.save(state, out / "checkpoint.tmp")
    os.replace(out / "checkpoint.tmp", out / "checkpoint.pt")  # atomic: a crash never leaves half a checkpoint


def load_checkpoint(out: Path) -> dict | None:
    path = out / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


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
    net = build_aegis(cfg.backbone, len(CLASSES[cfg.dataset]), cfg.channels, (cfg.image_size, cfg.image_size),
                      cfg.taps, cfg.shield_width)
    net.classifier.load_state_dict(weights)
    return net.classifier.eval()


def _progress(iterable, rt: Runtime, desc: str):
    return tqdm(iterable, desc=desc, disable=not rt.main, mininterval=1 if sys.stderr.isatty() else 30,
                dynamic_ncols=True, leave=False)


# ------------------------------------------------------------------------------------------------ stage 1: classifier
def train_classifier(cfg: TrainConfig, net: AegisNet, splits: dict[str, Split], cushion, rt: Runtime, out: Path,
                     checkpoint: dict | None, history: dict[str, list]) -> None:
    model = net.classifier
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.clf_lr, weight_decay=cfg.clf_weight_decay)
    steps_per_epoch = max(1, len(splits["train"].labels) // (cfg.clf_batch_size * rt.world))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.clf_lr, total_steps=cfg.clf_epochs * steps_per_epoch
                                                    + 1, pct_start=0.15)
    start = 0
    if checkpoint is not None and checkpoint["stage"] == "classifier":
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start = checkpoint["epoch"] + 1
    counts = np.bincount(splits["train"].labels, minlength=net.classifier.head[-1].out_features)
    class_weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32,
                                device=rt.device)  # inverse frequency: ~73% of Kermany train is PNEUMONIA
    trainable = DistributedDataParallel(model) if rt.world > 1 else model
    dataset = TrainImages(splits["train"], cushion, cfg.cushion_aug_prob, cfg.seed + rt.rank)
    for epoch in range(start, cfg.clf_epochs):
        model.train()
        total, seen, began = 0.0, 0, time.time()
        for x, y in _progress(loader(dataset, cfg.clf_batch_size, rt, epoch, cfg.seed), rt, f"classifier {epoch}"):
            x, y = x.to(rt.device), y.to(rt.device)
            if cfg.clf_adv_eps > 0:
                x = adversarial_batch(cfg, model, x, y)
            loss = F.cross_entropy(trainable(x), y, weight=class_weight, label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        if rt.world > 1:  # BatchNorm running statistics are per rank: adopt rank 0's so every rank holds one model
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        model.eval()
        val = classify(model, splits["val"].tensor(), cushion, rt.device)
        acc = float((val.argmax(1).numpy() == splits["val"].labels).mean())
        entry = {"epoch": epoch, "loss": total / max(seen, 1), "val_accuracy_cushion": acc,
                 "seconds": round(time.time() - began, 1)}
        history["classifier"].append(entry)
        log.info("classifier epoch %d/%d: loss %.4f, val accuracy (with Cushion) %.4f, %.0fs", epoch + 1,
                 cfg.clf_epochs, entry["loss"], acc, entry["seconds"])
        if rt.main:
            save_checkpoint(out, "classifier", epoch, net, optimizer, scheduler, history)


def adversarial_batch(cfg: TrainConfig, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Replace the first `clf_adv_fraction` of the batch by PGD-L∞ images (random start, CE towards the most likely
    wrong class, uint8-quantised) crafted against the current classifier."""
    n = int(round(cfg.clf_adv_fraction * len(x)))
    if n == 0:
        return x
    with torch.no_grad():
        was_training = model.training
        logits = model.eval()(x[:n])
        model.train(was_training)
    target = logits.masked_fill(F.one_hot(y[:n], logits.shape[1]).bool(), float("-inf")).argmax(1)
    config = PGDConfig(eps=cfg.clf_adv_eps, steps=cfg.clf_adv_steps)
    x_adv = pgd(model, x[:n], target, Objective(), config).x_adv
    return torch.cat([x_adv, x[n:]])


@torch.no_grad()
def classify(model: nn.Module, x: Tensor, cushion, device: torch.device, batch: int = 256) -> Tensor:
    """Logits of `model` on the Cushioned batch (cushion None: no Cushion)."""
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        xb = exact_cushion(xb, cushion) if cushion is not None else xb
        logits = model(xb.to(device))
        out.append((logits[0] if isinstance(logits, tuple) else logits).float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------- stage 2: Shields
class ShieldTrainer(nn.Module):
    """Wraps the Shields for DDP: maps frozen-classifier taps to all K Shield logits."""

    def __init__(self, net: AegisNet):
        super().__init__()
        self.shields = net.shields
        self._net = [net]  # not a submodule: the classifier is frozen and stays out of DDP

    def forward(self, taps: list[Tensor]) -> Tensor:
        return self._net[0].shield_logits(taps)


def training_objectives(cfg: TrainConfig, num_classes: int) -> list[Objective]:
    """The objectives the training attacker cycles through, batch by batch (`attack_objective`, e.g. "n1+ce")."""
    build = {"shield": ShieldOnlyObjective,
             "n1": lambda: RejectClassObjective(thresholds=torch.zeros(num_classes)),  # the Shields' operating point
             "wb": lambda: WhiteBoxObjective(kappa=cfg.attack_kappa),
             "ce": Objective}  # the conventional attacker: the classifier's CE only, blind to the Shields
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


def train_shields(cfg: TrainConfig, net: AegisNet, splits: dict[str, Split], cushion, rt: Runtime, out: Path,
                  checkpoint: dict | None, history: dict[str, list]) -> None:
    """Paper Eq. 4 with the gap closed: negatives are crafted by the WB objective towards the routed class.

    For an image of class y, the attacker picks a target t != y and minimises -S^t(f(C(x))) + J_cw(x, t) with PGD,
    BPDA through the real Cushion (identity backward, or a differentiable JPEG's: `attack_bpda`); S^y learns to accept C(x) and S^t to reject C(x_adv). The attacker always sees
    the current Shields (white-box adversarial training), with the epsilon curriculum of `TrainConfig.eps_at`.
    """
    torch.manual_seed(cfg.seed + 1)  # the same Shield run whether the classifier was trained here or loaded
    for p in net.classifier.parameters():
        p.requires_grad_(False)
    net.classifier.eval()
    optimizer = torch.optim.Adam(net.shields.parameters(), lr=cfg.shield_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.shield_epochs, 1))
    start = 0
    if checkpoint is not None and checkpoint["stage"] == "shield":
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start = checkpoint["epoch"] + 1
    trainer = ShieldTrainer(net)
    trainable = DistributedDataParallel(trainer) if rt.world > 1 else trainer
    num_classes = len(net.shields)
    objectives = training_objectives(cfg, num_classes)
    surrogates = training_surrogates(cfg)
    dataset = TrainImages(splits["train"], cushion, 0.0, cfg.seed + 1000 + rt.rank)
    generator = torch.Generator().manual_seed(cfg.seed + rt.rank)
    for epoch in range(start, cfg.shield_epochs):
        eps = cfg.eps_at(epoch)
        attacks = training_attacks(cfg, eps)
        stats = {"loss": 0.0, "clean_accept": 0.0, "adv_reject": 0.0, "adv_label": 0.0, "n": 0}
        began = time.time()
        batches = loader(dataset, cfg.shield_batch_size, rt, epoch, cfg.seed)
        for batch, (x, y) in enumerate(_progress(batches, rt, f"shield {epoch}")):
            x, y = x.to(rt.device), y.to(rt.device)
            offset = torch.randint(1, num_classes, y.shape, generator=generator).to(rt.device)
            target = (y + offset) % num_classes  # any class but the true one
            # every combination of objective, BPDA backward and attack setting in turn; sees the current Shields
            turn, objective = divmod(batch, len(objectives))
            adv = pgd(net, x, target, objectives[objective], attacks[turn // len(surrogates) % len(attacks)],
                      cushion=cushion, surrogate=surrogates[turn % len(surrogates)])
            with torch.no_grad():
                _, clean_taps = net.classifier.forward_with_taps(exact_cushion(x, cushion))
                adv_logits, adv_taps = net.classifier.forward_with_taps(exact_cushion(adv.x_adv, cushion))
            both = [torch.cat(pair) for pair in zip(clean_taps, adv_taps)]
            shield_logits = trainable(both)
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
        if rt.main:
            save_checkpoint(out, "shield", epoch, net, optimizer, scheduler, history)


# ------------------------------------------------------------------------------------------------------ entry point
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cxr-cpu", help="training/presets/<name>.json or a JSON path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--data-dir", help="dataset folder (default: $AEGIS_DATA_DIR or ../shared/data/<dataset>)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: log, config, checkpoint, bundle")
    parser.add_argument("--bundle-dir", type=Path, help="where to write the bundle (default: <out>/bundle)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--classifier-from", type=Path, metavar="RUN",
                        help="train only the Shields, on the finished classifier of another run (its folder or its "
                             "checkpoint.pt): ablations over Shield settings share one classifier")
    parser.add_argument("--shields-from", type=Path, metavar="RUN",
                        help="start from another finished run's classifier and Shields (its folder) and train the "
                             "Shields further under this config: e.g. a stronger attacker at the final epsilon")
    parser.add_argument("--skip-eval", action="store_true", help="export without the attack evaluation")
    parser.add_argument("--save-rank-weights", action="store_true",
                        help="each rank writes <out>/rank<k>.pt after training (the DDP consistency test)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    cfg = load_config(args.preset, overrides)
    rt = setup_runtime(cfg.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, rt.main)
    torch.manual_seed(cfg.seed)
    if rt.main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out / "command.txt").write_text(shlex.join(["python", "-m", "training.train", *(argv or sys.argv[1:])])
                                         + "\n")
    log.info("config: %s", json.dumps(cfg.to_dict()))
    log.info("world size %d, device %s", rt.world, rt.device)
    cushion = parse_cushion(cfg.cushion)
    splits, data_info = load_data(cfg)
    log.info("data: %s", json.dumps(data_info["counts"]))
    net = build_aegis(cfg.backbone, len(CLASSES[cfg.dataset]), cfg.channels, (cfg.image_size, cfg.image_size),
                      cfg.taps, cfg.shield_width, cfg.pretrained).to(rt.device)
    checkpoint = load_checkpoint(out) if args.resume else None
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"])
        log.info("resuming after %s epoch %d", checkpoint["stage"], checkpoint["epoch"] + 1)
    history = checkpoint["history"] if checkpoint is not None else {"classifier": [], "shield": []}
    if checkpoint is None and args.shields_from is not None:
        _, finished = load_finished_run(args.shields_from, shields=True)
        net.load_state_dict(finished["model"])
        history["classifier"] = finished["history"]["classifier"]
        history["initial_shields"] = finished["history"]["shield"]
        log.info("classifier and Shields taken from %s (%d Shield epochs)", args.shields_from,
                 len(history["initial_shields"]))
    elif checkpoint is None and args.classifier_from is not None:
        source = args.classifier_from if args.classifier_from.is_dir() else args.classifier_from.parent
        _, weights, history["classifier"] = load_finished_classifier(source)
        net.classifier.load_state_dict(weights)
        log.info("classifier taken from %s (%d epochs)", args.classifier_from, len(history["classifier"]))
    elif checkpoint is None or checkpoint["stage"] == "classifier":
        train_classifier(cfg, net, splits, cushion, rt, out, checkpoint, history)
    train_shields(cfg, net, splits, cushion, rt, out, checkpoint, history)
    if rt.world > 1:
        dist.barrier()
    if args.save_rank_weights:
        torch.save(net.state_dict(), out / f"rank{rt.rank}.pt")
    if rt.main:
        from training.export import finish_bundle

        finish_bundle(cfg, net.cpu().eval(), splits, data_info, history,
                      args.bundle_dir or out / "bundle", evaluate_attacks=not args.skip_eval,
                      command=(out / "command.txt").read_text().strip())
    if rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
