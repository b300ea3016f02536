"""Input normalisation choices: ImageNet statistics or the weights' own, validated by name."""

from __future__ import annotations

import pytest
import torch

from defectscope.detectors.patchcore import PatchCore
from defectscope.errors import DefectscopeError
from defectscope.features.normalization import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    check_normalization,
    input_stats,
)


def test_input_stats_by_name():
    assert input_stats("imagenet", (0.5,) * 3, (0.5,) * 3) == (IMAGENET_MEAN, IMAGENET_STD)
    assert input_stats("weights", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert set(NORMALIZATIONS) == {"imagenet", "weights"}


def test_unknown_name_lists_the_choices():
    with pytest.raises(DefectscopeError, match=r"'imagnet'.*imagenet, weights"):
        check_normalization("imagnet")


def test_detector_rejects_an_unknown_normalization_before_fitting():
    with pytest.raises(DefectscopeError, match="normalization"):
        PatchCore(image_size=64, normalization="zscore").fit(torch.rand(3, 3, 64, 64))


@pytest.mark.parametrize("name", NORMALIZATIONS)
def test_detector_input_stats_follow_the_parameter(name):
    det = PatchCore(normalization=name)
    expected = (IMAGENET_MEAN, IMAGENET_STD) if name == "imagenet" else ((0.5,) * 3, (0.5,) * 3)
    assert det.input_stats == expected
