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

__all__ = [
    "BORDER_PADDINGS",
    "LAYER_WEIGHTINGS",
    "check_choice",
    "concat_layers",
    "default_multiscale_layers",
    "layer_scales",
    "local_average",
    "weigh_layers",
]

#: how a p x p neighbourhood that crosses the map's edge is averaged (see :func:`local_average`)
BORDER_PADDINGS = ("zeros", "exclude")
#: how much each layer counts in a patch distance (see :func:`weigh_layers`)
LAYER_WEIGHTINGS = ("channels", "equal")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """Raise DefectscopeError naming ``name``, ``value`` and the ``choices`` when ``value`` is not one of them."""
    if value not in choices:
        raise DefectscopeError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


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


def local_average(maps: Sequence[torch.Tensor], patch_size: int, border: str = "zeros") -> list[torch.Tensor]:
    """Each (B, C, H, W) map averaged over every cell's p x p neighbourhood, stride 1, same size.

    PatchCore's locally aware patch features (Roth et al. 2022, eq. 2-3). ``border`` decides the
    neighbourhoods that cross the map's edge: "zeros" pads with zeros and divides by p^2, as the
    paper's reference implementation (it unfolds zero-padded patches) and anomalib (AvgPool2d) do,
    which shrinks edge features towards zero; "exclude" averages over the cells inside the map only.

    Raises:
        DefectscopeError: ``border`` is not one of :data:`BORDER_PADDINGS`.
    """
    check_choice("border_padding", border, BORDER_PADDINGS)
    pad = patch_size // 2
    return [F.avg_pool2d(m, patch_size, stride=1, padding=pad, count_include_pad=border == "zeros") for m in maps]


def layer_scales(channels: Sequence[int], weighting: str) -> list[float]:
    """The factor each layer's map is multiplied by before concatenation; see :func:`weigh_layers`.

    Raises:
        DefectscopeError: ``weighting`` is not one of :data:`LAYER_WEIGHTINGS`.
    """
    check_choice("layer_weighting", weighting, LAYER_WEIGHTINGS)
    if weighting == "channels":
        return [1.0] * len(channels)
    total, n = sum(channels), len(channels)
    return [(total / (n * c)) ** 0.5 for c in channels]


def weigh_layers(maps: Sequence[torch.Tensor], weighting: str = "channels") -> list[torch.Tensor]:
    """Each (B, C_l, H_l, W_l) map scaled so that the layers count in a squared distance as ``weighting`` says.

    "channels" leaves them as they are: every channel counts once, so a layer counts in proportion
    to its width (anomalib's concatenation). "equal" gives every layer the same number of
    dimensions' worth, as the PatchCore reference implementation does by mapping each layer's
    patch features to one common dimension before aggregating them (Roth et al. 2022, their
    ``Preprocessing``/``MeanMapper``): layer l is multiplied by sqrt(sum_k C_k / (L x C_l)), which
    equals repeating each of its channels sum_k C_k / (L x C_l) times; with layers of equal width
    nothing changes.

    Raises:
        DefectscopeError: ``weighting`` is not one of :data:`LAYER_WEIGHTINGS`.
    """
    scales = layer_scales([m.shape[1] for m in maps], weighting)
    return [m if s == 1.0 else m * s for m, s in zip(maps, scales)]
