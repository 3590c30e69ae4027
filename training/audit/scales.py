"""Audit scales: how many images and steps a figure was measured with. Every output records its scale.

`paper` follows the paper's protocol (§4.1: adaptive attacks 100 steps, the whole test split) and needs a GPU;
`cpu` gives the same tables in minutes on 2 cores (indicative only, wide confidence intervals); `release` is what a
shipped bundle's security report is measured with (128 images, 100 steps, ~5 core-hours: `--attack-cache` makes it
resumable); `tiny` is for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Scale:
    name: str
    eval_images: int  # attacked held-out test images (correctly classified) per attack
    clean_images: int  # clean test images for the negatives (0 = the whole test split)
    fit_images: int  # training images attacked to fit the detector baselines (clean + adversarial)
    reference_images: int  # clean training images for densities / means / LID references
    conventional_steps: int  # BIM / PGD / MIM / CW (HFC code: 10)
    adaptive_steps: int  # WB / WB_d / SPGD (paper: 100)
    stress_steps: int  # Table 1 BIM steps
    eps_sweep: tuple[float, ...]  # security-report sanity sweep (pixel units)
    dnn_iterations: int  # Metzen detector training iterations
    shield_epochs: int  # Table 5 Shield retraining
    shield_images: int  # Table 5 training images per retrained Shield
    bootstrap: int  # percentile bootstrap resamples
    # security report: every attack runs at each of these budgets (an attacker picks the budget), and the robustness
    # ceiling is measured at them
    report_budgets: tuple[float, ...] = (4 / 256, 8 / 256, 16 / 256)
    batch: int = 50

    def to_dict(self) -> dict:
        return asdict(self)


SCALES = {
    "paper": Scale("paper", eval_images=1000, clean_images=0, fit_images=1000, reference_images=2000,
                   conventional_steps=10, adaptive_steps=100, stress_steps=20,
                   eps_sweep=(4 / 256, 16 / 256, 64 / 256), dnn_iterations=2000, shield_epochs=25,
                   shield_images=0, bootstrap=2000, batch=100),
    # what a shipped bundle's security report is measured with on CPU: >= 128 attacked images, 100 steps
    "release": Scale("release", eval_images=128, clean_images=0, fit_images=96, reference_images=300,
                     conventional_steps=10, adaptive_steps=100, stress_steps=10,
                     eps_sweep=(4 / 256, 16 / 256, 64 / 256), dnn_iterations=200, shield_epochs=3,
                     shield_images=256, bootstrap=1000),
    "cpu": Scale("cpu", eval_images=64, clean_images=300, fit_images=96, reference_images=300,
                 conventional_steps=10, adaptive_steps=50, stress_steps=10,
                 eps_sweep=(4 / 256, 16 / 256, 64 / 256), dnn_iterations=200, shield_epochs=3,
                 shield_images=256, bootstrap=1000),
    "tiny": Scale("tiny", eval_images=8, clean_images=32, fit_images=16, reference_images=32,
                  conventional_steps=3, adaptive_steps=4, stress_steps=2, eps_sweep=(16 / 256, 64 / 256),
                  dnn_iterations=20, shield_epochs=1, shield_images=32, bootstrap=100,
                  report_budgets=(8 / 256, 16 / 256), batch=16),
}


def get_scale(name: str, **overrides) -> Scale:
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; choose one of {sorted(SCALES)}")
    return replace(SCALES[name], **overrides)
