"""Mid-level CNN feature maps from a timm backbone, cut after the deepest layer needed."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .errors import BackboneError
from .weights import create_model

log = logging.getLogger(__name__)


@lru_cache(maxsize=32)
def _feature_table(backbone: str) -> tuple[tuple[str, int, int], ...]:
    """(module name, channels, reduction) of every feature level timm offers, shallow to deep."""
    import timm

    if not isinstance(backbone, str) or not timm.models.is_model(backbone):
        raise BackboneError(f"unknown backbone {backbone!r}{_suggest(str(backbone))}")
    try:
        model = timm.create_model(backbone, pretrained=False, features_only=True, device="meta")
    except Exception as exc:
        raise BackboneError(f"backbone {backbone!r} cannot produce feature maps: {exc}") from exc
    info = model.feature_info
    return tuple(zip(info.module_name(), info.channels(), info.reduction()))


def _suggest(name: str) -> str:
    import timm

    stem = name.split(".", 1)[0]
    names = timm.list_models()
    close = difflib.get_close_matches(stem, names, n=5, cutoff=0.6)
    close += [n for n in timm.list_models(f"*{stem}*") if n not in close][: 5 - len(close)] if stem else []
    if not close:
        return "; see timm.list_models('*pattern*') for names"
    return f"; did you mean one of: {', '.join(close)}?"


def available_layers(backbone: str) -> list[str]:
    """Names of the feature levels of ``backbone``, shallow to deep (timm module names)."""
    return [name for name, _, _ in _feature_table(backbone)]


def default_layers(backbone: str) -> list[str]:
    """Two mid-level layers: ``blocks.2/blocks.4`` (EfficientNet), ``layer2/layer3`` (ResNet), else levels at stride 8 and 16."""
    names = available_layers(backbone)
    for pair in (["blocks.2", "blocks.4"], ["layer2", "layer3"]):
        if all(p in names for p in pair):
            return pair
    table = _feature_table(backbone)
    mid = [name for name, _, red in table if red in (8, 16)]
    if len(mid) >= 2:
        return [mid[0], mid[-1]] if len(mid) > 2 else mid
    return names[max(0, len(names) // 2 - 1) : len(names) // 2 + 1] or names


def _truncate(model: nn.Module, last: str) -> int:
    """Drop trailing ``blocks`` stages after ``last`` ("blocks.K") that timm's feature model still runs.

    EfficientNet/MobileNet feature models keep and run every stage; ResNet-style
    FeatureListNet already stops after the last requested module. Returns stages removed.
    """
    blocks = getattr(model, "blocks", None)
    parts = last.split(".")
    if not isinstance(blocks, nn.Sequential) or len(parts) != 2 or parts[0] != "blocks" or not parts[1].isdigit():
        return 0
    keep = int(parts[1]) + 1
    removed = len(blocks) - keep
    if removed > 0:
        model.blocks = blocks[:keep]
    return max(removed, 0)


class FeatureExtractor(nn.Module):
    """Frozen timm backbone returning the feature maps of ``layers``.

    forward: (B, 3, H, W) normalised images -> list of (B, C_l, H / s_l, W / s_l) float32
    tensors, one per layer in ``layers`` order (shallow to deep).
    """

    layers: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_info: dict[str, Any]

    def __init__(self, backbone: str, layers: Sequence[str] | None = None, weights: str | None = None) -> None:
        super().__init__()
        table = _feature_table(backbone)
        index = {name: i for i, (name, _, _) in enumerate(table)}
        wanted = list(default_layers(backbone) if layers is None else layers)
        if isinstance(layers, str):
            wanted = [layers]
        if not wanted:
            raise BackboneError(f"no layers given for {backbone}; valid layers: {', '.join(index)}")
        unknown = [name for name in wanted if name not in index]
        if unknown:
            raise BackboneError(
                f"unknown layer {unknown[0]!r} for backbone {backbone}; valid layers: {', '.join(index)}"
            )
        out_indices = tuple(sorted({index[name] for name in wanted}))

        loaded = create_model(backbone, weights, features_only=True, out_indices=out_indices)
        self.backbone = backbone
        self.layers = tuple(table[i][0] for i in out_indices)
        self.channels = tuple(table[i][1] for i in out_indices)
        self.strides = tuple(table[i][2] for i in out_indices)
        self.mean, self.std = loaded.mean, loaded.std
        self.weights_info = loaded.info
        self.model = loaded.model
        removed = _truncate(self.model, self.layers[-1])
        if removed:
            log.debug("%s: dropped %d unused stages after %s", backbone, removed, self.layers[-1])
        self.model.requires_grad_(False)
        # channels_last measured faster on a 2-core CPU at 8x3x256x256 (lite0 ~2x, wide_resnet50_2 ~1.3x).
        self.model.to(memory_format=torch.channels_last)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Always stays in eval mode (frozen BatchNorm statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per layer (B, C_l, H_l, W_l) float32, contiguous."""
        feats = self.model(x.float().contiguous(memory_format=torch.channels_last))
        if len(feats) != len(self.layers):
            raise BackboneError(f"{self.backbone} returned {len(feats)} feature maps, expected {len(self.layers)}")
        return [f.float().contiguous() for f in feats]

    def extra_repr(self) -> str:
        return f"backbone={self.backbone!r}, layers={self.layers}, channels={self.channels}, strides={self.strides}"
