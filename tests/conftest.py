"""Shared fixtures: the synthetic MVTec-layout dataset, a small fitted model, real-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from synthetic import make_mvtec_category

SHARED_DATA = Path(
    os.environ.get("DEFECTSCOPE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"
PILL = SHARED_DATA / "mvtec_ad" / "pill"

torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


@pytest.fixture(scope="session")
def synthetic_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec AD-layout category: textured good images, scratches and spots with masks."""
    root = tmp_path_factory.mktemp("synthetic")
    return make_mvtec_category(root, name="synthetic", n_train=24, n_test_good=10, n_test_defect=10, size=128, seed=0)


@pytest.fixture(scope="session")
def bottle() -> Path:
    """The real MVTec AD bottle category; the test is skipped when it is absent."""
    if not (BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"real data not found at {BOTTLE}")
    return BOTTLE


@pytest.fixture(scope="session")
def pill() -> Path:
    """The real MVTec AD pill category (400 x 400); the test is skipped when it is absent."""
    if not (PILL / "train" / "good").is_dir():
        pytest.skip(f"real data not found at {PILL}")
    return PILL
