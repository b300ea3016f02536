"""Multi-scale patch embeddings: several layers' maps resized to the finest one and concatenated.

PaDiM (Defard et al. 2020, sec. 3.1) and SPADE (Cohen & Hoshen 2020, sec. 3.2) describe each
image patch by the activations of several CNN layers at that location. Deeper (coarser) maps
are brought to the finest map's size by nearest-neighbour upsampling, which copies every coarse
activation to the fine cells it covers -- what the PaDiM reference does with its
unfold/fold concatenation -- and then all channels are concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import DefectscopeError

__all__ = ["concat_layers", "default_multiscale_layers"]


def default_multiscale_layers(backbone: str) -> list[str] | None:
    """Default layers for PaDiM/SPADE: the first three stages after the stem, or None if unknown.

    resnet*/wide_resnet*: layer1, layer2, layer3; tf_efficientnet_lite*: blocks.1, blocks.2, blocks.4
    (strides 4, 8, 16). None means: use the backbone's own defaults.
    """
    name = backbone.lower()
    if name.startswith(("resnet", "wide_resnet")):
        return ["layer1", "layer2", "layer3"]
    if name.startswith("tf_efficientnet_lite"):
        return ["blocks.1", "blocks.2", "blocks.4"]
    return None


def concat_layers(maps: Sequence[torch.Tensor], mode: str = "nearest") -> torch.Tensor:
    """Upsample maps [(B, C_l, H_l, W_l)] to the largest H_l x W_l and concatenate: (B, sum C_l, H, W)."""
    if not maps:
        raise DefectscopeError("no feature maps to concatenate: choose at least one layer")
    target = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    out = []
    for m in maps:
        if m.shape[-2:] != target:
            kwargs = {} if mode == "nearest" else {"align_corners": False}
            m = F.interpolate(m, size=tuple(target), mode=mode, **kwargs)
        out.append(m)
    return torch.cat(out, dim=1)
