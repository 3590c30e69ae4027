"""An untrained bundle of a given architecture, for latency and throughput benchmarks only (never for diagnosis).

Latency depends on the graph, not on the weights, so the serving figures of a paper-scale model (ResNet-50 at
224 px) can be measured on any machine without its days of training:

    python -m benchmarks.bundle --backbone resnet50 --size 224 --out /tmp/bench-resnet50-224
    python -m benchmarks.service --bundle /tmp/bench-resnet50-224 --device cuda

The bundle is marked as such everywhere a user could see it: its name starts with `benchmark-`, its version is
`untrained`, and its model card says it must not be used. Thresholds are 0 (half the images will be rejected,
which exercises both decisions).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from models.bundle import CalibrationSpec, Manifest
from models.cushion import parse_cushion
from models.imaging import InputSpec
from models.networks import SHIELD_KINDS, build_aegis
from training.export import round_to_half, write_bundle


def build_benchmark_bundle(out: Path, backbone: str, size: int, channels: int, classes: tuple[str, ...],
                           shield_width: int, cushion: str = "jpeg:80", seed: int = 0,
                           shield_kind: str = "per_class") -> Manifest:
    torch.manual_seed(seed)
    spec = InputSpec(channels=channels, height=size, width=size)
    net = round_to_half(build_aegis(backbone, len(classes), channels, (size, size),
                                    shield_width=shield_width, shield_kind=shield_kind).eval())
    name = f"benchmark-{backbone}-{size}"
    card = (f"# {name} (untrained)\n\nRandom weights, exported by `python -m benchmarks.bundle` to measure serving "
            "latency and throughput of this architecture. **Its outputs mean nothing: never use it for diagnosis.**\n")
    manifest = Manifest(
        name=name, version="untrained", classes=classes, input=spec, cushion=parse_cushion(cushion),
        thresholds={c: 0.0 for c in classes},
        calibration=CalibrationSpec(clean_rejection_rate=0.5, split="none (untrained benchmark bundle)"),
        architecture=net.architecture(),
        metrics={"note": "untrained: benchmark only"})
    return write_bundle(out, net, manifest, card, weights=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bundle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet50", "vgg16"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", nargs="+", default=["NORMAL", "PNEUMONIA"])
    parser.add_argument("--shield-width", type=int, default=32)
    parser.add_argument("--cushion", default="jpeg:80")
    parser.add_argument("--shield-kind", default="per_class", choices=SHIELD_KINDS,
                        help="one Shield network per class, or one shared trunk with a head per class")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    manifest = build_benchmark_bundle(args.out, args.backbone, args.size, args.channels, tuple(args.classes),
                                      args.shield_width, args.cushion, shield_kind=args.shield_kind)
    print(f"{manifest.name} ({manifest.architecture.backbone}, {args.size} px) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
