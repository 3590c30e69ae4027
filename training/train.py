"""Train a defended Medical Aegis bundle: classifier -> adversarially trained Shields -> (optionally) both fine-tuned
together (`joint_epochs`) -> calibration -> evaluation -> export (`models/bundle.py`).

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
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from models.bundle import Manifest, threshold_array
from models.cushion import parse_cushion
from models.imaging import InputSpec
from models.networks import AegisNet
from training.classifier import train_classifier
from training.config import TrainConfig, load_config
from training.data import CLASSES, Split, load_data
from training.distributed import setup_worker
from training.evaluate import attack_metrics, attack_suite, calibrate, clean_metrics
from training.export import round_to_half, write_bundle
from training.joint import train_jointly
from training.model_card import model_card
from training.runs import load_checkpoint, load_finished_classifier, load_finished_run, network_for, start_run
from training.shields import train_shields

log = logging.getLogger("aegis.train")


# ----------------------------------------------------------------------------------------- stage 3: calibrate, export
def finish_bundle(cfg: TrainConfig, net: AegisNet, splits: dict[str, Split], data_info: dict, history: dict,
                  bundle_dir: Path, evaluate_attacks: bool = True, command: str = "") -> Manifest:
    """Round to float16, calibrate the thresholds on validation, measure on test, write the bundle."""
    net = round_to_half(net.eval())
    classes = CLASSES[cfg.dataset]
    cushion = parse_cushion(cfg.cushion)
    spec = InputSpec(channels=cfg.channels, height=cfg.image_size, width=cfg.image_size)
    calibration = calibrate(net, splits["val"].tensor(), splits["val"].labels, cushion, classes,
                            cfg.clean_rejection_rate)
    thresholds = calibration.thresholds
    log.info("thresholds %s on %s validation images", thresholds, calibration.counts)
    thresholds_by_index = threshold_array(thresholds, classes)
    x_test, y_test = splits["test"].tensor(), splits["test"].labels
    metrics: dict = {"clean": clean_metrics(net, x_test, y_test, cushion, thresholds_by_index)}
    log.info("clean test: %s", metrics["clean"])
    if evaluate_attacks:
        specs = attack_suite(torch.from_numpy(thresholds_by_index).float(), steps=cfg.eval_steps,
                             kappa=cfg.attack_kappa)
        metrics["attacks"] = attack_metrics(net, x_test, y_test, cushion, thresholds_by_index, specs,
                                            cfg.eval_images, cfg.eval_batch_size, cfg.seed)
        for name, r in metrics["attacks"].items():
            log.info("%s: label success %.3f, AUROC %.3f, rejected of successful %.3f, bypass %.3f", name,
                     r["asr_label"], r["auroc"], r["rejected_of_successful"], r["bypass_rate"])
    metrics["scale"] = (f"{cfg.backbone} at {cfg.image_size} px; {metrics['clean']['n']} test images; attacks on "
                        f"{cfg.eval_images} correctly classified test images")
    metrics["command"] = command
    metrics["history"] = history
    manifest = Manifest(
        name=cfg.name, version=cfg.version, classes=classes, input=spec, cushion=cfg.cushion,
        thresholds=thresholds,
        calibration=calibration.spec(cfg.clean_rejection_rate, "val"),
        architecture=net.architecture(),
        training=cfg.to_dict(), data=data_info, metrics=metrics)
    return write_bundle(bundle_dir, net, manifest, model_card(manifest, metrics, command))


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
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    cfg = load_config(args.preset, overrides)
    worker = setup_worker(cfg.threads)
    out: Path = args.out
    start_run(out, cfg, argv, worker.main)
    torch.manual_seed(cfg.seed)
    log.info("config: %s", json.dumps(cfg.to_dict()))
    log.info("world size %d, device %s", worker.world, worker.device)
    cushion = parse_cushion(cfg.cushion)
    splits, data_info = load_data(cfg)
    log.info("data: %s", json.dumps(data_info["counts"]))
    net = network_for(cfg, cfg.pretrained).to(worker.device)
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
        train_classifier(cfg, net, splits, cushion, worker, out, checkpoint, history)
    if checkpoint is None or checkpoint["stage"] != "joint":
        train_shields(cfg, net, splits, cushion, worker, out, checkpoint, history)
    if cfg.joint_epochs > 0:
        train_jointly(cfg, net, splits, cushion, worker, out, checkpoint, history)
    if worker.world > 1:
        dist.barrier()
    if args.save_rank_weights:
        torch.save(net.state_dict(), out / f"rank{worker.rank}.pt")
    if worker.main:
        finish_bundle(cfg, net.cpu().eval(), splits, data_info, history, args.bundle_dir or out / "bundle",
                      evaluate_attacks=not args.skip_eval, command=(out / "command.txt").read_text().strip())
    if worker.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
