"""The attack library: every attack of the audit by name, as a configuration of the one engine (`engine.pgd`),
except CW-L2 (`cw_l2.py` says why).

    spec = build_attack("apgd_wb", thresholds=thresholds)          # paper budget and steps by default
    result = spec(net, x, target, cushion)                          # AttackResult, judged through the exact Cushion

Every attack is targeted (binary task: target = the other class), takes images in [0, 1], returns uint8-level
images inside its budget (L∞ or L2, /256 as in the paper) and the best iterate, and reports success through the
exact Cushion: label = target, and, when the attack is given Shield thresholds, accepted by the target's Shield.
The conventional attacks ignore the Shield (also when they pick their best iterate); like every attack here they
see the Cushion through BPDA (identity backward) when one is passed. `ATTACKS` lists the names with one line each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from models.cushion import CushionBase
from training.attacks.cw_l2 import cw_l2
from training.attacks.engine import AttackResult, PGDConfig, judge, pgd
from training.attacks.feature_attacks import fit_hfc_mixtures, nearest_guides
from training.attacks.objectives import (CWObjective, FeatureObjective, HFCObjective, Objective,
                                        RejectClassObjective, WhiteBoxObjective)
from training.attacks.transforms import DiffJpeg, DiverseInput, GaussianSmoothing, RandomTranslate

LINF_EPS = 16 / 256  # paper §4.1
L2_EPS = 8 / 256  # paper §4.1; at most ~64 one-level pixel changes after uint8 rounding: sweep it (eps_sweep)
ADAPTIVE_STEP_RATIO = 1 / 8  # step 2/256 at the paper's 16/256 (`attacks-reference.md` §11: the paper gives none)

Run = Callable[..., AttackResult]


@dataclass(frozen=True)
class AttackSpec:
    """A named, fully configured attack: `spec(net, x, target, cushion: CushionBase | None = None) -> AttackResult`."""

    name: str
    description: str
    run: Run
    eps: float | None  # None: unbounded (CW-L2 without a budget)
    norm: str
    steps: int

    def __call__(self, net: nn.Module, x: Tensor, target: Tensor, cushion: CushionBase | None = None) -> AttackResult:
        return self.run(net, x, target, cushion)


def _engine_spec(name: str, description: str, objective: Objective, config: PGDConfig,
                 surrogate_for: Callable | None = None) -> AttackSpec:
    def run(net, x, target, cushion: CushionBase | None = None):
        surrogate = surrogate_for(cushion) if surrogate_for is not None else None
        return pgd(net, x, target, objective, config, cushion=cushion, surrogate=surrogate)

    return AttackSpec(name, description, run, config.eps, config.norm, config.steps)


def jpeg_quality(cushion: CushionBase) -> float:
    """The quality of a JPEG Cushion, for a differentiable-JPEG surrogate; other Cushions are refused."""
    quality = getattr(cushion, "quality", None)
    if quality is None:
        raise ValueError(f"a differentiable-JPEG surrogate needs a JPEG Cushion, got {cushion!r}")
    return float(quality)


def _need_thresholds(thresholds: Tensor | None) -> Tensor:
    if thresholds is None:
        raise ValueError("attacks on the Shield need the bundle's thresholds (thresholds=...)")
    return thresholds


def _white_box(thresholds: Tensor | None, kappa: float) -> WhiteBoxObjective:
    return WhiteBoxObjective(thresholds=_need_thresholds(thresholds), kappa=kappa)


# --- conventional attacks (paper §4.1, `attacks-reference.md` §1): 10 steps as in the HFC code ------------------

def _fgsm(eps, steps, thresholds):
    return _engine_spec("fgsm", f"FGSM: one sign step of size eps={eps * 256:g}/256 on targeted CE",
                        Objective(), PGDConfig(eps=eps, steps=1, step_size=eps, random_start=False))


def _bim(eps, steps, thresholds):
    return _engine_spec("bim", f"BIM: {steps} sign steps of 2eps/{steps} from x, CE",
                        Objective(), PGDConfig(eps=eps, steps=steps, step_size=2 * eps / steps, random_start=False))


def _pgd_linf(eps, steps, thresholds, restarts=1):
    return _engine_spec("pgd_linf", f"PGD-L∞: {steps} steps of 2.5eps/{steps}, uniform random start, CE",
                        Objective(), PGDConfig(eps=eps, steps=steps, restarts=restarts))


def _pgd_l2(eps, steps, thresholds, restarts=1):
    return _engine_spec("pgd_l2", f"PGD-L2: {steps} normalised steps of 2.5eps/{steps}, random start in the ball, "
                        "CE, uint8-aware L2 projection", Objective(),
                        PGDConfig(eps=eps, steps=steps, norm="l2", restarts=restarts))


def _mim(eps, steps, thresholds, momentum=1.0):
    return _engine_spec("mim", f"MI-FGSM: {steps} steps of eps/{steps}, momentum {momentum} on the L1-normalised "
                        "gradient (Dong et al.), CE", Objective(),
                        PGDConfig(eps=eps, steps=steps, step_size=eps / steps, random_start=False, momentum=momentum))


def _dim(eps, steps, thresholds, p=0.5):
    return _engine_spec("dim", f"DI-FGSM: {steps} steps of 2eps/{steps} on random resize [0.9W, W) + pad with "
                        f"probability {p}, CE", Objective(),
                        PGDConfig(eps=eps, steps=steps, step_size=2 * eps / steps, random_start=False,
                                  transform=DiverseInput(p=p)))


def _tim(eps, steps, thresholds, kernel=7):
    return _engine_spec("tim", f"TI-FGSM: {steps} steps of 2eps/{steps}, gradient smoothed by a {kernel}x{kernel} "
                        "Gaussian (nsig 3), CE", Objective(),
                        PGDConfig(eps=eps, steps=steps, step_size=2 * eps / steps, random_start=False,
                                  gradient_filter=GaussianSmoothing(size=kernel)))


def _cw_linf(eps, steps, thresholds, kappa=100.0, restarts=1):
    return _engine_spec("cw_linf", f"CW-L∞: PGD-L∞ ({steps} steps, random start) on the CW margin, kappa={kappa:g}",
                        CWObjective(kappa=kappa), PGDConfig(eps=eps, steps=steps, restarts=restarts))


def _cw_l2(eps, steps, thresholds, kappa=0.0, search_steps=9):
    bound = "unbounded" if eps is None else f"candidates projected into L2 eps={eps * 256:g}/256"
    objective = CWObjective(kappa=kappa)

    def run(net, x, target, cushion: CushionBase | None = None):
        return cw_l2(net, x, target, objective, cushion=cushion, eps=eps, search_steps=search_steps,
                     max_iterations=steps)

    return AttackSpec("cw_l2", f"CW-L2: Adam (lr 1e-2) in tanh space, {steps} iterations x {search_steps} binary-"
                      f"search steps on c (from 1e-3), kappa={kappa:g}, smallest successful L2; {bound}",
                      run, eps, "l2", steps)


def with_transfer_smoothing(config: PGDConfig) -> PGDConfig:
    """`config` with the transfer attack's input diversity (DI) and translation-invariant gradient (TI): the one
    definition the transfer attack and the training attacker's `attack_smoothing=mixed` share."""
    return replace(config, transform=DiverseInput(), gradient_filter=GaussianSmoothing())


def _transfer(eps, steps, thresholds, substitute: nn.Module | None = None):
    if substitute is None:
        raise ValueError("a transfer attack needs a trained substitute model (substitute=...), e.g. a VGG-16 "
                         "TappedClassifier trained on the same training split")
    config = with_transfer_smoothing(PGDConfig(eps=eps, steps=steps, step_size=eps / steps, random_start=False,
                                               momentum=1.0))
    backbone = getattr(substitute, "backbone_name", type(substitute).__name__)

    def run(net, x, target, cushion: CushionBase | None = None):
        # Crafted on the undefended substitute (no Cushion, no Shield), then judged on the defended target.
        crafted = pgd(substitute, x, target, Objective(), config)
        objective = Objective(thresholds=thresholds)
        success, reached = judge(net, crafted.x_adv, target, objective, cushion)
        return AttackResult(crafted.x_adv, success, reached, crafted.losses)

    return AttackSpec("transfer", f"transfer: MI-DI-TI-FGSM ({steps} steps of eps/{steps}, momentum 1, DI p 0.5, "
                      f"TI 7x7) on the undefended substitute {backbone}, judged on the target pipeline",
                      run, eps, "linf", steps)


# --- adaptive attacks on the full pipeline (paper §4.1, `attacks-reference.md` §2-3): 100 steps -----------------

def _wb_config(eps, steps, restarts=1, **changes) -> PGDConfig:
    # eps / 8 (2/256 at the paper's budget) so that an eps sweep keeps the same step-to-budget ratio
    return PGDConfig(**{"eps": eps, "steps": steps, "step_size": ADAPTIVE_STEP_RATIO * eps, "restarts": restarts,
                        **changes})


def _wb(eps, steps, thresholds, kappa=10.0, restarts=1):
    return _engine_spec("wb", f"WB: minimise -S^t + J_cw (kappa={kappa:g}), {steps} steps of eps/8, random start, "
                        "BPDA identity", _white_box(thresholds, kappa), _wb_config(eps, steps, restarts))


def _wb_n1(eps, steps, thresholds, restarts=1):
    return _engine_spec("wb_n1", f"PGD on targeted CE of the (N+1)-class wrapper (reject = class N+1; Carlini & "
                        f"Wagner 2017), {steps} steps of eps/8, random start, BPDA identity",
                        RejectClassObjective(thresholds=_need_thresholds(thresholds)), _wb_config(eps, steps, restarts))


def _wb_n1_ti(eps, steps, thresholds, restarts=1, kernel=7):
    # The (N+1)-class objective with TI-FGSM's smoothed gradient: a low-frequency perturbation that sees the Shield.
    return _engine_spec("wb_n1_ti", f"as wb_n1, gradient smoothed by a {kernel}x{kernel} Gaussian (TI, Dong et al. "
                        f"2019): {steps} steps of eps/8, random start, BPDA identity",
                        RejectClassObjective(thresholds=_need_thresholds(thresholds)),
                        _wb_config(eps, steps, restarts, gradient_filter=GaussianSmoothing(size=kernel)))


def _wbd(eps, steps, thresholds, kappa=10.0, restarts=1):
    return _engine_spec("wbd", f"WB_d: as WB, step x0.1 at step {steps // 2}", _white_box(thresholds, kappa),
                        _wb_config(eps, steps, restarts, decay_steps=(steps // 2,)))


def _two_objective(direction: str):
    def build(eps, steps, thresholds, kappa=10.0, restarts=1):
        what = ("J_cw until the target is reached, then -S^t only" if direction == "selective" else
                "each gradient made orthogonal to the other objective's")
        return _engine_spec(f"{direction[0]}pgd", f"{direction} PGD (Bryniarski et al. 2022): {what}; WB objective "
                            f"(kappa={kappa:g}), {steps} steps of eps/8, x0.1 at {steps // 2}",
                            _white_box(thresholds, kappa),
                            _wb_config(eps, steps, restarts, decay_steps=(steps // 2,), direction=direction))
    return build


def _apgd_wb(eps, steps, thresholds, kappa=10.0, restarts=1):
    return _engine_spec("apgd_wb", f"APGD (Croce & Hein 2020) on the WB objective (kappa={kappa:g}), {steps} steps, "
                        "step 2eps halved at checkpoints, momentum 0.75", _white_box(thresholds, kappa),
                        PGDConfig(eps=eps, steps=steps, optimiser="apgd", restarts=restarts))


def _apgd_ce(eps, steps, thresholds, restarts=1, backward="identity"):
    if backward not in ("identity", "diffjpeg"):
        raise ValueError(f"apgd_ce: backward must be 'identity' or 'diffjpeg', got {backward!r}")
    surrogate = (lambda cushion: DiffJpeg(jpeg_quality(cushion))) if backward == "diffjpeg" else None
    return _engine_spec("apgd_ce", f"APGD (Croce & Hein 2020) on targeted CE, {steps} steps, BPDA {backward}, "
                        "ignores the Shield", Objective(),
                        PGDConfig(eps=eps, steps=steps, optimiser="apgd", restarts=restarts), surrogate)


def _wb_diffjpeg(eps, steps, thresholds, kappa=10.0, restarts=1):
    return _engine_spec("wb_diffjpeg", f"WB ({steps} steps of eps/8) with BPDA through a differentiable JPEG "
                        "(kornia, the Cushion's quality) instead of the identity", _white_box(thresholds, kappa),
                        _wb_config(eps, steps, restarts), lambda cushion: DiffJpeg(jpeg_quality(cushion)))


def _wb_eot(eps, steps, thresholds, kappa=10.0, restarts=1, eot_samples=10, quality_spread=10.0, shift=2):
    def surrogate(cushion: CushionBase):
        q = jpeg_quality(cushion)
        return DiffJpeg((max(q - quality_spread, 1.0), min(q + quality_spread, 100.0)))

    return _engine_spec("wb_eot", f"WB ({steps} steps of eps/8) with EOT: gradients averaged over {eot_samples} "
                        f"draws of differentiable JPEG (quality ±{quality_spread:g}) x translations ±{shift} px",
                        _white_box(thresholds, kappa),
                        _wb_config(eps, steps, restarts, eot_samples=eot_samples,
                                   transform=RandomTranslate(shift)), surrogate)


def _wb_eot_cushion(eps, steps, thresholds, kappa=10.0, restarts=1, eot_samples=10):
    """EOT over a randomised Cushion's own distribution: every forward pass is a fresh exact draw of the Cushion,
    every backward a differentiable JPEG drawn from the same quality range and grid offsets."""
    def surrogate(cushion: CushionBase):
        q, spread = jpeg_quality(cushion), getattr(cushion, "quality_spread", 0)
        return DiffJpeg((max(q - spread, 1.0), min(q + spread, 100.0)) if spread else q,
                        max_grid_shift=getattr(cushion, "max_shift", 0))

    return _engine_spec("wb_eot_cushion", f"WB ({steps} steps of eps/8) with EOT over the Cushion's own random "
                        f"draws: gradients averaged over {eot_samples} draws of quality and JPEG grid offset",
                        _white_box(thresholds, kappa), _wb_config(eps, steps, restarts, eot_samples=eot_samples),
                        surrogate)


def _fea(label_weight: float):
    def build(eps, steps, thresholds, guide_pool: tuple[Tensor, Tensor] | None = None, layers=None, kappa=10.0,
              restarts=1):
        if guide_pool is None:
            raise ValueError("Fea needs training images to pick guides from (guide_pool=(x_train, y_train))")
        config = _wb_config(eps, steps, restarts)
        judged = Objective(thresholds=thresholds)

        def run(net, x, target, cushion: CushionBase | None = None):
            taps = tuple(layers) if layers is not None else tuple(getattr(net, "classifier", net).taps)
            guides = nearest_guides(net, x, target, *guide_pool, taps, cushion, judged)
            objective = FeatureObjective(thresholds=thresholds, kappa=kappa, feature_layers=taps, guides=guides,
                                         label_weight=label_weight)
            return pgd(net, x, target, objective, config, cushion=cushion)

        label = "" if not label_weight else f" + J_cw (kappa={kappa:g})"
        return AttackSpec("fea" if not label_weight else "fea_cw",
                          f"Fea (Sabour et al.): match the tap features of the nearest accepted target-class "
                          f"training image{label}; {steps} steps of eps/8, random start", run, eps, "linf", steps)
    return build


# The HFC authors' schedule (MIRACLE-Center/Hierarchical_Feature_Constraint, HFC_Attack.py, CXR + ResNet-50): BIM
# from the clean image with a fixed step of 0.5/256/50 and 2 eps / step iterations (3,200 at 16/256).
HFC_REFERENCE_STEP = 0.5 / 256 / 50


def _hfc(use_cw: bool, reference: bool = False):
    def build(eps, steps, thresholds, guide_pool: tuple[Tensor, Tensor] | None = None, mixtures=None,
              n_components=1, weight=1.0, kappa=100.0, restarts=1):
        if mixtures is None and guide_pool is None:
            raise ValueError("HFC needs mixtures=(layers, mixtures) from fit_hfc_mixtures, or guide_pool=(x, y)")
        config = (PGDConfig(eps=eps, steps=steps, step_size=HFC_REFERENCE_STEP, random_start=False) if reference
                  else _wb_config(eps, steps, restarts))
        fitted: dict = {}

        def run(net, x, target, cushion: CushionBase | None = None):
            key = (id(net), id(cushion))
            if mixtures is None and key not in fitted:  # fitted once per model and Cushion, on Cushioned features
                fitted[key] = fit_hfc_mixtures(net, *guide_pool, cushion=cushion, n_components=n_components)
            layers, per_class = mixtures if mixtures is not None else fitted[key]
            objective = HFCObjective(thresholds=thresholds, kappa=kappa, feature_layers=layers, mixtures=per_class,
                                     weight=weight, use_cw=use_cw)
            return pgd(net, x, target, objective, config, cushion=cushion)

        loss = f"CW margin (kappa={kappa:g})" if use_cw else "CE"
        schedule = (f"BIM from x, {steps} steps of {HFC_REFERENCE_STEP * 256:g}/256 (the authors' schedule)"
                    if reference else f"{steps} steps of eps/8, random start")
        return AttackSpec("hfc_cw" if use_cw else "hfc",
                          f"HFC (Yao et al. 2021): {loss} + {weight:g} x Mahalanobis distance of every layer's pooled "
                          f"features (<= 512 channels) to the target class's GMM ({n_components} component(s)); "
                          f"{schedule}", run, eps, "linf", steps)
    return build


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., AttackSpec]
    eps: float | None
    steps: int
    summary: str


ATTACKS: dict[str, _Entry] = {
    "fgsm": _Entry(_fgsm, LINF_EPS, 1, "one sign step (Goodfellow et al. 2015)"),
    "bim": _Entry(_bim, LINF_EPS, 10, "iterative FGSM from x (Kurakin et al. 2017)"),
    "pgd_linf": _Entry(_pgd_linf, LINF_EPS, 10, "PGD-L∞ with random start (Madry et al. 2018)"),
    "pgd_l2": _Entry(_pgd_l2, L2_EPS, 10, "PGD-L2 with random start"),
    "mim": _Entry(_mim, LINF_EPS, 10, "momentum iterative FGSM (Dong et al. 2018)"),
    "dim": _Entry(_dim, LINF_EPS, 10, "input diversity (Xie et al. 2019)"),
    "tim": _Entry(_tim, LINF_EPS, 10, "translation-invariant gradient smoothing (Dong et al. 2019)"),
    "cw_linf": _Entry(_cw_linf, LINF_EPS, 10, "PGD-L∞ on the CW margin"),
    "cw_l2": _Entry(_cw_l2, None, 1000, "Carlini-Wagner L2 with binary search on c (minimum distortion)"),
    "transfer_vgg16": _Entry(_transfer, LINF_EPS, 20, "MI-DI-TI-FGSM on a substitute (pass substitute=)"),
    "wb": _Entry(_wb, LINF_EPS, 100, "white-box -S^t + J_cw, BPDA identity (paper)"),
    "wb_n1": _Entry(_wb_n1, LINF_EPS, 100, "white-box CE on the (N+1)-class wrapper (Carlini & Wagner 2017)"),
    "wb_n1_ti": _Entry(_wb_n1_ti, LINF_EPS, 100, "wb_n1 with a translation-invariant (smoothed) gradient"),
    "wbd": _Entry(_wbd, LINF_EPS, 100, "WB with step decay at 50 (paper)"),
    "spgd": _Entry(_two_objective("selective"), LINF_EPS, 100, "selective PGD (Bryniarski et al. 2022)"),
    "opgd": _Entry(_two_objective("orthogonal"), LINF_EPS, 100, "orthogonal PGD (Bryniarski et al. 2022)"),
    "apgd_ce": _Entry(_apgd_ce, LINF_EPS, 100, "APGD on targeted CE (ignores the Shield)"),
    "apgd_wb": _Entry(_apgd_wb, LINF_EPS, 100, "APGD on the WB objective (Croce & Hein 2020)"),
    "wb_diffjpeg": _Entry(_wb_diffjpeg, LINF_EPS, 100, "WB with a differentiable-JPEG BPDA backward (Reich 2024)"),
    "wb_eot": _Entry(_wb_eot, LINF_EPS, 100, "WB with EOT over JPEG quality and translations (Athalye 2018)"),
    "wb_eot_cushion": _Entry(_wb_eot_cushion, LINF_EPS, 100, "WB with EOT over a randomised Cushion's draws"),
    "fea": _Entry(_fea(0.0), LINF_EPS, 100, "feature matching to a target-class guide (Sabour et al. 2016)"),
    "fea_cw": _Entry(_fea(1.0), LINF_EPS, 100, "Fea + CW margin on the label"),
    "hfc": _Entry(_hfc(False), LINF_EPS, 100, "PGD + hierarchical feature constraint (Yao et al. 2021)"),
    "hfc_cw": _Entry(_hfc(True), LINF_EPS, 100, "CW-L∞ + hierarchical feature constraint"),
    "hfc_ref": _Entry(_hfc(False, reference=True), LINF_EPS, 2 * round(LINF_EPS / HFC_REFERENCE_STEP),
                      "HFC with its authors' schedule: BIM, fixed step 0.5/256/50 (3,200 steps at 16/256)"),
}


# Short names the audit and its reports use for library attacks.
ALIASES = {"pgd": "pgd_linf", "cw": "cw_linf", "tf": "transfer_vgg16"}
_READABLE_EXTRA = {"torchattacks_pgd": "torchattacks' PGD on the (N+1)-class wrapper (cross-check)"}


def long_name(key: str) -> str:
    """A readable name for a report key: `wb100@4` -> "white-box -S^t + J_cw, BPDA identity (paper); 100 steps;
    ε 4/256"; keys stay short in files, every table also shows this."""
    base, _, eps = key.partition("@")
    known = {*ATTACKS, *ALIASES, *_READABLE_EXTRA}
    # the longest known name followed by digits only (`wb_n1100` = wb_n1, 100 steps)
    splits = ((base[:i], base[i:]) for i in range(len(base), 0, -1))
    name = next((head for head, tail in splits if head in known and (tail.isdigit() or not tail)),
                base.rstrip("0123456789"))
    steps = base[len(name):]
    entry = ATTACKS.get(ALIASES.get(name, name))
    what = entry.summary if entry is not None else _READABLE_EXTRA.get(name, name)
    return "; ".join([what, *([f"{steps} steps"] if steps else []), *([f"ε {eps}/256"] if eps else [])])


def build_attack(name: str, eps: float | None = None, steps: int | None = None, thresholds: Tensor | None = None,
                 **options) -> AttackSpec:
    """The attack `name` (a key of `ATTACKS`) at budget `eps` (default: the paper's for its norm) and `steps`.

    `thresholds` (one Shield threshold per class) are required by the attacks on the Shield (wb, wbd, spgd, opgd,
    apgd_wb, wb_diffjpeg, wb_eot) and make success end-to-end for fea / hfc / transfer; the conventional attacks
    ignore them. Options per attack: restarts, kappa, momentum (mim), p (dim), kernel (tim), search_steps (cw_l2),
    backward (apgd_ce: identity | diffjpeg), substitute (transfer_vgg16), guide_pool / layers (fea), guide_pool or
    mixtures, n_components, weight (hfc), eot_samples, quality_spread, shift (wb_eot).
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    entry = ATTACKS[name]
    spec = entry.build(eps if eps is not None else entry.eps, steps if steps is not None else entry.steps,
                       thresholds, **options)
    return replace(spec, name=name)


def eps_sweep(name: str, eps_values: list[float], net: nn.Module, x: Tensor, target: Tensor, cushion: CushionBase | None = None,
              seed: int = 0, **options) -> list[dict]:
    """Success rate of attack `name` per budget (sanity check: it must rise to ~100% as eps grows)."""
    rows = []
    for eps in eps_values:
        torch.manual_seed(seed)
        result = build_attack(name, eps=eps, **options)(net, x, target, cushion)
        rows.append({"eps": eps, "eps_256": eps * 256, "success_rate": float(result.success.float().mean()),
                     "label_rate": float(result.label_reached.float().mean())})
    return rows
