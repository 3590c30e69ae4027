"""Command line of the audit: one command per paper table, and the bundle's security report.

    python -m training.audit table1 --bundle models/default --scale cpu --out results/table1
    python -m training.audit table2 --bundle models/default --attacks mim,bim,pgd,cw --out results/table2
    python -m training.audit table3 --bundle models/default --data-dir ../shared/data/kermany-pneumonia --out results/table3
    python -m training.audit table4 --bundle models/default --out results/table4
    python -m training.audit table5 --bundle models/default --out results/table5
    python -m training.audit report --bundle runs/x/bundle --scale cpu [--substitute runs/vgg16]
    python -m training.audit report --bundle runs/x/bundle --attacks wb_n1,apgd_wb --out runs/x/screen  # a screen
    python -m training.audit report --bundle models/default --scale release --attack-cache runs/cache  # resumable
    python -m training.audit ceiling --bundle models/default --set adaptive_steps=100   # robust accuracy, APGD-CE
    python -m training.audit randomised --bundle runs/x/bundle --out results/kermany/randomised  # randomised Cushion
    python -m training.audit second-opinion --bundle models/default --referee runs/x/bundle --attacks wb_n1 --out DIR

`--dataset` defaults to the bundle's training dataset; `--data-dir` to $AEGIS_DATA_DIR or ../shared/data/<dataset>.
Tables write `<out>/<table>.json`, `.md` and `_roc.png`; `report` writes into the bundle and re-hashes its manifest;
`report --attacks` (a screen of designs: those attacks at every budget, plus the ceiling) writes `<out>/screen.*` only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from models.bundle import load_bundle
from models.cushion import RandomisedJpegCushion, parse_cushion
from models.networks import load_aegis
from training.audit import tables
from training.audit.ceiling import ceiling_markdown, robust_accuracy
from training.audit.harness import load_audit_data
from training.audit.outputs import write_result
from training.audit.randomised import STUDY_ATTACKS, STUDY_COLUMNS, randomised_cushion_study
from training.audit.report import REPORT_COLUMNS, security_report, summary_line, write_into_bundle
from training.audit.scales import get_scale
from training.audit.second_opinion import second_opinion_study
from training.runs import load_trained_classifier

TABLES = ("table1", "table2", "table3", "table4", "table5")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=(*TABLES, "report", "ceiling", "randomised", "second-opinion"))
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the embedded one)")
    parser.add_argument("--dataset", choices=("kermany", "aptos"), help="default: the bundle's dataset")
    parser.add_argument("--data-dir", type=Path, help="dataset folder")
    parser.add_argument("--scale", default="cpu", help="cpu | paper | tiny (training/audit/scales.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                        help="override a scale field, e.g. --set eval_images=32")
    parser.add_argument("--attacks", help="comma-separated attack names (tables 2-5)")
    parser.add_argument("--out", type=Path, help="output folder of a table (default: results/<table>)")
    parser.add_argument("--substitute", type=Path, help="run folder of a classifier trained on the same data, the "
                        "transfer attack's source (e.g. --set backbone=vgg16 --set clf_lr=0.0002 --set shield_epochs=0 --skip-eval: "
                        "VGG-16 has no batch norm and does not learn at the ResNet learning rate)")
    parser.add_argument("--attack-cache", type=Path, metavar="DIR",
                        help="report / second-opinion: keep each finished attack's images in DIR and reuse them, so "
                             "that an interrupted report (hours at --scale release on CPU) resumes where it stopped")
    parser.add_argument("--ceiling-cushion", default=None, metavar="SPEC",
                        help="ceiling only: measure Cushion SPEC + classifier instead of the bundle's Cushion (e.g. "
                             "`none`: the classifier alone, to see what the Cushion adds to or takes from robustness)")
    parser.add_argument("--ceiling-split", choices=("test", "train"), default="test",
                        help="ceiling only: attack test images (the figure) or training-split images (robust overfitting:"
                             " a classifier robust on the images it learnt from but not on new ones)")
    parser.add_argument("--randomised-cushion", default="jpeg_random", metavar="SPEC", help="randomised only: "
                        "quality_spread=10,max_shift=2 (RandomisedJpegCushion fields; quality from the bundle)")
    parser.add_argument("--referee", type=Path, help="second-opinion only: a bundle whose classifier must be confident "
                        "in the bundle's diagnosis (e.g. a TRADES classifier's margin bundle)")
    parser.add_argument("--tries", type=int, default=5, help="randomised only: requests an attacker may resubmit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = get_scale(args.scale, **{k: int(v) for k, v in (item.split("=", 1) for item in args.set)})
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    dataset = args.dataset or m.data.get("dataset", "kermany")
    train_images = scale.reference_images + 2 * scale.fit_images + scale.shield_images
    data = load_audit_data(dataset, args.data_dir, m.input, train_images, scale.clean_images, args.seed)
    ctx = tables.Context(load_aegis(bundle), m, data, scale, args.seed,
                         shlex.join(["python", "-m", "training.audit", *argv]), attack_cache=args.attack_cache)
    if args.substitute is not None:
        ctx.substitute = load_trained_classifier(args.substitute)
    if args.command == "ceiling":
        cushion = ctx.cushion if args.ceiling_cushion is None else parse_cushion(args.ceiling_cushion)
        images = ctx.clean_test() if args.ceiling_split == "test" else (ctx.data.x_train, ctx.data.y_train)
        ceiling = robust_accuracy(ctx.net.classifier, *images, cushion, scale.eval_images,
                                  scale.adaptive_steps, batch=scale.batch, seed=args.seed, n_resamples=scale.bootstrap)
        ceiling.update(bundle=f"{m.name} {m.version}", split=args.ceiling_split,
                       scale=scale.to_dict(),
                       command=ctx.command)
        out = args.out or Path("results") / "ceiling"
        out.mkdir(parents=True, exist_ok=True)
        (out / "ceiling.json").write_text(json.dumps(ceiling, indent=2) + "\n")
        title = f"# Robustness ceiling: {m.name} {m.version} ({bundle.root})"  # a run's bundle has the preset's name
        (out / "ceiling.md").write_text(f"{title}\n\n{ceiling_markdown(ceiling)}\n\n`{ctx.command}`\n")
        print(ceiling_markdown(ceiling))
        return 0
    attacks = args.attacks.split(",") if args.attacks else None
    if args.command == "randomised":
        options = dict(item.split("=", 1) for item in args.randomised_cushion.split(",") if "=" in item)
        cushion = RandomisedJpegCushion(quality=getattr(m.cushion, "quality", 80), seed=args.seed, **options)
        result = randomised_cushion_study(ctx, cushion, args.tries, tuple(attacks) if attacks else STUDY_ATTACKS)
        for path in write_result(result, args.out or Path("results") / "randomised", "randomised", STUDY_COLUMNS):
            print(path)
        return 0
    if args.command == "second-opinion":
        if args.referee is None or attacks is None:
            raise SystemExit("second-opinion needs --referee BUNDLE and --attacks (a screen of the pair)")
        referee = load_bundle(args.referee)
        result = second_opinion_study(ctx, load_aegis(referee), referee.manifest, attacks)
        for path in write_result(result, args.out or Path("results") / "second-opinion", "second_opinion",
                                 REPORT_COLUMNS, ctx.curves or None):
            print(path)
        print(summary_line(result))
        return 0
    if args.command == "report":
        result = security_report(ctx, attacks)
        if attacks is None:
            result["_curves"] = ctx.curves
            paths = write_into_bundle(bundle, result)
        else:  # a screen never becomes the bundle's security report
            paths = write_result(result, args.out or Path("results") / "screen", "screen", REPORT_COLUMNS,
                                 ctx.curves or None)
        for path in paths:
            print(path)
        print(summary_line(result))
        return 0
    runners = {"table1": lambda: tables.table1(ctx), "table2": lambda: tables.table2(ctx, attacks),
               "table3": lambda: tables.table3(ctx, attacks), "table4": lambda: tables.table4(ctx, attacks),
               "table5": lambda: tables.table5(ctx, tuple(attacks) if attacks else ("pgd", "cw", "hfc", "wb"))}
    columns = {"table1": tables.STRESS_COLUMNS, "table2": tables.BASELINE_COLUMNS, "table3": tables.SHIELD_COLUMNS,
               "table4": tables.SHIELD_COLUMNS, "table5": tables.ABLATION_COLUMNS}
    result = runners[args.command]()
    out = args.out or Path("results") / args.command
    for path in write_result(result, out, args.command, columns[args.command], ctx.curves or None):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
