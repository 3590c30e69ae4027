"""Shared fixtures: real images from the shared data folder, a tiny trained bundle, a briefly trained classifier."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("AEGIS_DATA_DIR", REPO.parent / "shared" / "data"))
KERMANY = DATA_ROOT / "kermany-pneumonia"


@pytest.fixture(scope="session")
def kermany_dir() -> Path:
    if not (KERMANY / "labels.csv").is_file():
        pytest.fail(f"the Kermany data is required for these tests: {KERMANY} (set AEGIS_DATA_DIR)")
    return KERMANY


@pytest.fixture(scope="session")
def xray_paths(kermany_dir) -> list[Path]:
    """A fixed handful of real test-split X-rays of both classes."""
    normal = sorted((kermany_dir / "test" / "NORMAL").glob("*.png"))[:4]
    pneumonia = sorted((kermany_dir / "test" / "PNEUMONIA").glob("*.png"))[:4]
    return normal + pneumonia


@pytest.fixture(scope="session")
def xray_images(xray_paths) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p).convert("L"))[:, :, None] for p in xray_paths]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, kermany_dir) -> Path:
    """The whole training entry point on the tiny preset (a few dozen real images): run folder with a bundle."""
    from training.train import main

    out = tmp_path_factory.mktemp("tiny-run")
    assert main(["--preset", "tiny", "--data-dir", str(kermany_dir), "--out", str(out), "--set", "threads=2"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_run) -> Path:
    return tiny_run / "bundle"
