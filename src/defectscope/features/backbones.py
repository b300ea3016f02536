"""Mid-level CNN feature maps from a timm backbone, cut after the deepest layer needed.

A backbone name may also be an ensemble of up to three timm models joined by ``+``
(``tf_efficientnet_lite0+tf_efficientnet_lite2``): see :class:`EnsembleExtractor`. The name
functions here (:func:`available_layers`, :func:`available_blocks`, :func:`stage_blocks`,
:func:`default_layers`) then give the names every member has, channels summed over members.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError
from .normalization import input_stats
from .weights import NO_WEIGHTS, PACKAGED_LITE, create_model

log = logging.getLogger(__name__)


#: joins the members of a backbone ensemble: ``tf_efficientnet_lite0+tf_efficientnet_lite2``
ENSEMBLE_SEPARATOR = "+"
MAX_MEMBERS = 3


def is_ensemble(backbone: str) -> bool:
    """Whether ``backbone`` names several models joined by ``+``."""
    return isinstance(backbone, str) and ENSEMBLE_SEPARATOR in backbone


@lru_cache(maxsize=32)
def ensemble_members(backbone: str) -> tuple[str, ...]:
    """The member names of ``"a+b[+c]"``, checked: known timm models, at most 3, none repeated.

    A plain backbone name gives a one-member tuple (unchecked here).
    """
    if not is_ensemble(backbone):
        return (backbone,)
    members = tuple(m.strip() for m in backbone.split(ENSEMBLE_SEPARATOR))
    if any(not m for m in members):
        raise BackboneError(
            f"backbone ensemble {backbone!r} has an empty member: join timm names with '+', "
            "e.g. tf_efficientnet_lite0+tf_efficientnet_lite2"
        )
    if len(members) > MAX_MEMBERS:
        raise BackboneError(
            f"backbone ensemble {backbone!r} has {len(members)} members; at most {MAX_MEMBERS} are allowed"
        )
    repeated = sorted({m for m in members if members.count(m) > 1})
    if repeated:
        raise BackboneError(f"backbone ensemble {backbone!r} repeats {repeated[0]}: each member may appear once")
    import timm

    for member in members:
        if not timm.models.is_model(member):
            raise BackboneError(
                f"unknown backbone {member!r} in ensemble {backbone!r}{_suggest(member)} "
                f"(backbones with offline weights: {', '.join(PACKAGED_LITE)}; any timm model name is accepted)"
            )
    return members


def _common_rows(backbone: str, tables: list[tuple[tuple[Any, ...], ...]]) -> tuple[tuple[Any, ...], ...]:
    """Rows (name, channels, reduction, ...) of the names every member has, in the first member's order,
    channels summed over members, the rest from the first member; an error if no name is shared."""
    by_name = [{row[0]: row for row in table} for table in tables]
    rows = []
    for row in tables[0]:
        if all(row[0] in names for names in by_name[1:]):
            rows.append((row[0], sum(int(names[row[0]][1]) for names in by_name), *row[2:]))
    if not rows:
        listing = "; ".join(f"{m}: {', '.join(r[0] for r in t)}" for m, t in zip(ensemble_members(backbone), tables))
        raise BackboneError(
            f"the members of {backbone!r} share no layer names ({listing}); "
            "choose members of one family, e.g. tf_efficientnet_lite0+tf_efficientnet_lite2"
        )
    return tuple(rows)


@lru_cache(maxsize=32)
def _feature_table(backbone: str) -> tuple[tuple[str, int, int], ...]:
    """(module name, channels, reduction) of every feature level timm offers, shallow to deep.

    For an ensemble: the levels every member has, channels summed, the first member's reduction.
    """
    import timm

    if is_ensemble(backbone):
        tables = [_feature_table(m) for m in ensemble_members(backbone)]
        return _common_rows(backbone, tables)  # type: ignore[return-value]
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


def _resolve(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule ``name`` of a timm feature model (FeatureListNet writes nested names with ``_``)."""
    for candidate in (name, name.replace(".", "_", 1)):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


@lru_cache(maxsize=32)
def _block_table(backbone: str) -> tuple[tuple[str, int, int, int], ...]:
    """(name, channels, reduction, depth rank) of every feature level and every block inside one.

    A feature level ("layer2", "blocks.2") that is an ``nn.Sequential`` contributes its blocks
    ("layer2.0", "layer2.1", ...); shapes come from one forward pass on the meta device.
    Ordered shallow to deep; a level sorts right after its last block (same tensor). For an
    ensemble: the names every member has, channels summed, reduction and rank of the first member.
    """
    import timm

    if is_ensemble(backbone):
        tables = [_block_table(m) for m in ensemble_members(backbone)]
        return _common_rows(backbone, tables)  # type: ignore[return-value]
    table = _feature_table(backbone)
    model = timm.create_model(backbone, pretrained=False, features_only=True, device="meta").eval()
    shapes: dict[str, tuple[int, int]] = {}
    handles = []
    names: list[tuple[str, int, int]] = []  # (name, level index, block index or 1e6)
    for level, (stage, _, _) in enumerate(table):
        module = _resolve(model, stage)
        if isinstance(module, nn.Sequential):
            for j, (child, block) in enumerate(module.named_children()):
                name = f"{stage}.{child}"
                names.append((name, level, j))
                handles.append(block.register_forward_hook(_shape_hook(shapes, name)))
        names.append((stage, level, 10**6))
    with torch.no_grad():
        model(torch.empty(1, 3, 256, 256, device="meta"))
    for handle in handles:
        handle.remove()
    rows = []
    for rank, (name, level, _) in enumerate(sorted(names, key=lambda r: (r[1], r[2]))):
        if name in shapes:
            channels, height = shapes[name]
            rows.append((name, channels, 256 // height, rank))
        else:
            rows.append((name, table[level][1], table[level][2], rank))
    return tuple(rows)


def _shape_hook(shapes: dict[str, tuple[int, int]], name: str) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        shapes[name] = (int(output.shape[1]), int(output.shape[-2]))

    return hook


def available_blocks(backbone: str) -> list[str]:
    """Every block inside each feature level plus the levels themselves, shallow to deep.

    E.g. resnet18: act1, layer1.0, layer1.1, layer1, layer2.0, ...; tf_efficientnet_lite0:
    blocks.0.0, blocks.0, blocks.1.0, blocks.1.1, blocks.1, ... . A level name gives the same
    features as its last block.
    """
    return [name for name, _, _, _ in _block_table(backbone)]


def stage_blocks(backbone: str) -> dict[str, list[str]]:
    """{feature level: its block names, shallow to deep} (empty list for a level without blocks)."""
    out: dict[str, list[str]] = {name: [] for name in available_layers(backbone)}
    for name, _, _, _ in _block_table(backbone):
        stage = name.rsplit(".", 1)[0]
        if name not in out and stage in out:
            out[stage].append(name)
    return out


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


def _store_hook(store: dict[str, torch.Tensor], name: str) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        store[name] = output

    return hook


class FeatureExtractor(nn.Module):
    """Frozen timm backbone returning the feature maps of ``layers``.

    ``layers`` are feature levels (:func:`available_layers`) or, via forward hooks, any block
    inside one (:func:`available_blocks`, e.g. "layer2.1" or "blocks.2.0").

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
            blocks = {name: row for name, *row in _block_table(backbone)}
            bad = [name for name in unknown if name not in blocks]
            if bad:
                raise BackboneError(
                    f"unknown layer {bad[0]!r} for backbone {backbone}; valid layers: {', '.join(index)}"
                    f"; or blocks: {', '.join(n for n in blocks if n not in index)}"
                )
            self._init_hooked(backbone, wanted, blocks, weights)
            return
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
        self._hooked: dict[str, torch.Tensor] | None = None
        self._freeze()

    def _freeze(self) -> None:
        self.model.requires_grad_(False)
        # channels_last measured faster on a 2-core CPU at 8x3x256x256 (lite0 ~2x, wide_resnet50_2 ~1.3x).
        self.model.to(memory_format=torch.channels_last)
        self.eval()

    def _init_hooked(self, backbone: str, wanted: list[str], blocks: dict[str, list[int]], weights: str | None) -> None:
        """Block-level layers ("layer2.1", "blocks.2.0"): forward hooks on a model cut after the deepest one.

        The feature model runs up to the level holding the deepest requested block; inside that
        level, blocks after it are dropped too unless the whole level was requested.
        """
        table = _feature_table(backbone)
        levels = [name for name, _, _ in table]
        chosen = sorted(set(wanted), key=lambda n: blocks[n][2])
        deepest = chosen[-1]
        level_name = deepest if deepest in levels else deepest.rsplit(".", 1)[0]
        level = levels.index(level_name)
        loaded = create_model(backbone, weights, features_only=True, out_indices=(level,))
        self.backbone = backbone
        self.layers = tuple(chosen)
        self.channels = tuple(int(blocks[n][0]) for n in chosen)
        self.strides = tuple(int(blocks[n][1]) for n in chosen)
        self.mean, self.std = loaded.mean, loaded.std
        self.weights_info = loaded.info
        self.model = loaded.model
        _truncate(self.model, level_name)
        if deepest != level_name:  # drop the level's blocks after the deepest requested one
            stage = _resolve(self.model, level_name)
            assert isinstance(stage, nn.Sequential)
            keep = list(dict(stage.named_children())).index(deepest.rsplit(".", 1)[1]) + 1
            del stage[keep:]
        self._hooked = {}
        for name in chosen:
            module = _resolve(self.model, name)
            if module is None:
                raise BackboneError(f"layer {name!r} of {backbone} cannot be hooked; use a feature level instead")
            module.register_forward_hook(_store_hook(self._hooked, name))
        self._freeze()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always stays in eval mode (frozen BatchNorm statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per layer (B, C_l, H_l, W_l) float32, contiguous."""
        x = x.float().contiguous(memory_format=torch.channels_last)
        if self._hooked is not None:
            self._hooked.clear()
            self.model(x)
            feats = [self._hooked.pop(name) for name in self.layers]
            return [f.float().contiguous() for f in feats]
        feats = self.model(x)
        if len(feats) != len(self.layers):
            raise BackboneError(f"{self.backbone} returned {len(feats)} feature maps, expected {len(self.layers)}")
        return [f.float().contiguous() for f in feats]

    def extra_repr(self) -> str:
        return f"backbone={self.backbone!r}, layers={self.layers}, channels={self.channels}, strides={self.strides}"


def concat_on_grid(per_member: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per layer, the members' maps on the first member's grid, concatenated along channels.

    per_member: for each member, its per-layer (B, C_{m,l}, H_{m,l}, W_{m,l}) maps in one layer order.
    Returns per layer (B, sum_m C_{m,l}, H_{0,l}, W_{0,l}); a map on another grid is resampled
    bilinearly (align_corners=False) first; maps already on the grid are used as they are.
    """
    out = []
    for maps in zip(*per_member):
        grid = tuple(maps[0].shape[-2:])
        on_grid = [
            m if tuple(m.shape[-2:]) == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in maps
        ]
        out.append(torch.cat(on_grid, dim=1))
    return out


class EnsembleExtractor(nn.Module):
    """Several frozen backbones ("a+b[+c]") seen as one: per layer their maps concatenated on one grid.

    Every member is a :class:`FeatureExtractor` for the same ``layers`` (names every member has,
    :func:`available_layers` of the ensemble name); each layer's maps are brought to the first
    member's grid and concatenated along channels (:func:`concat_on_grid`), so a detector sees
    one feature map per layer with ``channels`` = the members' sum and the first member's ``strides``.

    Weights: ``None`` gives every member its default source (the packaged offline weights of
    tf_efficientnet_lite0/1/2, else timm's download); ``"none"`` random weights for all; one file
    cannot serve several models and is refused.

    Input normalisation: ``mean``/``std`` are the first member's weights' statistics, so images
    arrive normalised as ``input_stats(normalization, mean, std)``. With ``normalization="weights"``
    a member whose weights were trained with other statistics gets the input re-normalised to
    its own inside :meth:`forward`; with ``"imagenet"`` every member sees ImageNet-normalised input.

    forward: (B, 3, H, W) -> list of (B, C_l, H / s_l, W / s_l) float32, one per layer.
    """

    layers: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_info: dict[str, Any]

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str] | None = None,
        weights: str | None = None,
        normalization: str = "weights",
    ) -> None:
        super().__init__()
        names = ensemble_members(backbone)
        if weights is not None and str(weights).strip().lower() != NO_WEIGHTS:
            raise BackboneError(
                f"--weights {weights} names one state dict, but backbone {backbone!r} is an ensemble of "
                f"{len(names)} models: leave --weights out (each member loads its own default weights, "
                "the packaged ones for tf_efficientnet_lite0/1/2) or use --weights none for random weights"
            )
        wanted = [layers] if isinstance(layers, str) else list(default_layers(backbone) if layers is None else layers)
        valid = available_layers(backbone)
        if not wanted:
            raise BackboneError(f"no layers given for {backbone}; valid layers: {', '.join(valid)}")
        blocks = available_blocks(backbone)
        bad = [name for name in wanted if name not in blocks]
        if bad:
            raise BackboneError(
                f"unknown layer {bad[0]!r} for backbone {backbone} (names every member has); valid layers: "
                f"{', '.join(valid)}; or blocks: {', '.join(n for n in blocks if n not in valid)}"
            )
        self.backbone = backbone
        self.normalization = normalization
        self.members = nn.ModuleList(FeatureExtractor(m, wanted, weights=weights) for m in names)
        first = self.members[0]
        self.layers = first.layers
        self.strides = first.strides
        self.channels = tuple(sum(m.channels[m.layers.index(n)] for m in self.members) for n in self.layers)
        self.mean, self.std = first.mean, first.std
        # per member: (scale, shift) taking the input to the member's own statistics, or None (same)
        in_mean, in_std = input_stats(normalization, self.mean, self.std)
        self._renorm: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for m in self.members:
            mean, std = input_stats(normalization, m.mean, m.std)
            if (mean, std) == (in_mean, in_std):
                self._renorm.append(None)
                continue
            # x_m = (x * s_in + m_in - m_m) / s_m
            s_in, m_in, s_m, m_m = (torch.tensor(v).view(1, 3, 1, 1) for v in (in_std, in_mean, std, mean))
            self._renorm.append((s_in / s_m, (m_in - m_m) / s_m))
            log.info(
                "%s: %s expects mean %s std %s; its input is re-normalised inside the extractor",
                backbone,
                m.backbone,
                mean,
                std,
            )
        self.weights_info = {
            "source": "ensemble",
            "members": [
                {"backbone": m.backbone, **m.weights_info, "mean": list(m.mean), "std": list(m.std)}
                for m in self.members
            ],
        }
        self.eval()

    def train(self, mode: bool = True) -> EnsembleExtractor:
        """Always stays in eval mode (frozen BatchNorm statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per layer (B, sum_m C_{m,l}, H_l, W_l) float32 on the first member's grid."""
        per_member = []
        for member, renorm in zip(self.members, self._renorm):
            xm = x if renorm is None else x.float() * renorm[0].to(x.device) + renorm[1].to(x.device)
            feats = dict(zip(member.layers, member(xm)))
            per_member.append([feats[name] for name in self.layers])
        return concat_on_grid(per_member)

    def extra_repr(self) -> str:
        return f"backbone={self.backbone!r}, layers={self.layers}, channels={self.channels}, strides={self.strides}"


Extractor = FeatureExtractor | EnsembleExtractor


def build_extractor(
    backbone: str, layers: Sequence[str] | None = None, weights: str | None = None, normalization: str = "weights"
) -> Extractor:
    """The extractor for ``backbone``: a :class:`FeatureExtractor`, or an :class:`EnsembleExtractor`
    for ``"a+b[+c]"`` (``normalization`` matters only there: see its docstring)."""
    if is_ensemble(backbone):
        return EnsembleExtractor(backbone, layers, weights=weights, normalization=normalization)
    return FeatureExtractor(backbone, layers, weights=weights)
