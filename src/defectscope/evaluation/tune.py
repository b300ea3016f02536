"""Feature-layer selection: which block of each backbone stage, and which stages, suit a dataset.

Candidates: for each stage searched (by default the method's own layers, e.g. PaDiM on a
ResNet: layer1, layer2, layer3), every block inside it ("layer2.0" ... "layer2.3"; the last
block is written as the stage name, "layer2", since it is the same tensor), and every
non-empty combination of stages. The space is listed with its size before anything runs; a
``full`` grid or a seeded ``random`` draw of ``max_trials`` is evaluated.

Cost: the backbone runs once per image. A single :class:`~defectscope.features.backbones.FeatureExtractor`
hooks every block any candidate needs and the maps are cached as float16 (bounded by
``max_cache_bytes``); each candidate's detector is then fitted and scored from the cache through
:class:`CachedFeatures`, a stand-in extractor that serves the cached maps of the images whose
indices arrive as the "image" batch.

No cheating: candidates are ranked on a validation split only -- labelled images given
separately, or a stratified fraction of the test set held out for validation -- and the winner
is reported on the remaining test images separately.
"""

from __future__ import annotations

import csv
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..components.embedding import default_multiscale_layers
from ..data.geometry import ImageSize, Placement, check_image_size, check_resize, input_shape
from ..data.images import load_mask
from ..data.loader import iter_batches
from ..data.samples import Sample
from ..detectors import make_detector
from ..detectors.base import Detector
from ..errors import DataLayoutError, DefectscopeError
from ..features.backbones import Extractor, build_extractor, default_layers, stage_blocks
from ..features.normalization import DEFAULT_NORMALIZATION, input_stats
from . import metrics

log = logging.getLogger(__name__)

SEARCHES: tuple[str, ...] = ("random", "full")
DEFAULT_MAX_CACHE_BYTES = 6 * 2**30


# --------------------------------------------------------------------------- search space
def default_stages(backbone: str, method: str) -> list[str]:
    """The stages searched by default: PaDiM/SPADE's three multi-scale layers, PatchCore's two mid layers."""
    if method in ("padim", "spade"):
        return default_multiscale_layers(backbone) or default_layers(backbone)
    return default_layers(backbone)


def search_space(backbone: str, stages: Sequence[str]) -> list[tuple[str, ...]]:
    """Every candidate layer combination: a block per chosen stage, for every non-empty set of stages.

    Ordered: more stages first, then shallow blocks before deep ones. Size
    = prod_s (n_blocks(s) + 1) - 1.
    """
    table = stage_blocks(backbone)
    unknown = [s for s in stages if s not in table]
    if unknown:
        raise DefectscopeError(f"unknown stage {unknown[0]!r} for {backbone}; valid stages: {', '.join(table)}")
    stages = [s for s in table if s in set(stages)]  # shallow to deep, no duplicates
    # the stage's last block is the stage output: name it by the stage (a plain features_only layer)
    options = {s: ([*table[s][:-1], s]) if table[s] else [s] for s in stages}
    space: list[tuple[str, ...]] = []
    for n in range(len(stages), 0, -1):
        for subset in itertools.combinations(stages, n):
            space.extend(itertools.product(*(options[s] for s in subset)))
    return space


def choose_trials(
    space: Sequence[tuple[str, ...]], max_trials: int | None, search: str, seed: int = 0
) -> list[tuple[str, ...]]:
    """The candidates to evaluate: all (``full``, cut at ``max_trials``) or a seeded random draw."""
    if search not in SEARCHES:
        raise DefectscopeError(f"unknown search {search!r}; choose one of: {', '.join(SEARCHES)}")
    if max_trials is not None and max_trials < 1:
        raise DefectscopeError(f"--max-trials must be at least 1, got {max_trials}")
    n = len(space) if max_trials is None else min(max_trials, len(space))
    if search == "full":
        if n < len(space):
            log.warning("full grid of %d candidates cut to the first %d (--max-trials)", len(space), n)
        return list(space[:n])
    picked = np.random.default_rng(seed).choice(len(space), size=n, replace=False)
    return [space[i] for i in sorted(picked)]


# --------------------------------------------------------------------------- validation split
def split_validation(samples: Sequence[Sample], fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(validation, held-out) from labelled test samples: ``fraction`` of each defect type, seeded.

    Every type with at least two images gives at least one to each side.
    """
    if not 0 < fraction < 1:
        raise DefectscopeError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_type.setdefault(s.defect_type, []).append(i)
    val: set[int] = set()
    for indices in by_type.values():
        k = int(round(fraction * len(indices)))
        if len(indices) >= 2:
            k = min(max(k, 1), len(indices) - 1)
        val.update(rng.permutation(indices)[:k].tolist())
    validation = [s for i, s in enumerate(samples) if i in val]
    held_out = [s for i, s in enumerate(samples) if i not in val]
    return validation, held_out


# --------------------------------------------------------------------------- feature cache
class CachedFeatures(nn.Module):
    """A stand-in feature extractor serving cached maps; plugs into ``Detector.set_extractor``.

    The detector is fed "images" that are index tokens: (B, 1, 1, 1) float tensors holding row
    numbers of the cache (see :func:`tokens`). forward returns, per layer in ``layers``, the
    cached (B, C_l, h_l, w_l) maps of those rows as float32.
    """

    def __init__(self, cache: FeatureCache, layers: Sequence[str]) -> None:
        super().__init__()
        self.cache = cache
        self.backbone = cache.backbone
        self.layers = tuple(layers)
        self.channels = tuple(int(cache.maps[n].shape[1]) for n in self.layers)
        self.strides = tuple(cache.strides[n] for n in self.layers)
        self.mean, self.std = cache.mean, cache.std
        self.weights_info = cache.weights_info

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, 1, 1) index tokens -> per layer (B, C_l, h_l, w_l) float32."""
        rows = x.reshape(x.shape[0], -1)[:, 0].round().long()
        return [self.cache.maps[name].index_select(0, rows).float() for name in self.layers]


def tokens(rows: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of (B, 1, 1, 1) index tokens standing for cached images (exact below 2**24)."""
    rows = list(rows)
    for i in range(0, len(rows), batch_size):
        yield torch.tensor(rows[i : i + batch_size], dtype=torch.float32).view(-1, 1, 1, 1)


@dataclass
class FeatureCache:
    """Float16 feature maps of every hooked block for a list of images, from one pass per image.

    maps: {layer: (N, C, h, w) float16}; row i belongs to ``paths[i]``.
    placements: where each row's image lies in the model input (to take its maps back over the photo).
    """

    backbone: str
    paths: list[Path]
    maps: dict[str, torch.Tensor]
    strides: dict[str, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_info: dict[str, Any]
    seconds: float = 0.0
    passes: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        extractor: Extractor,
        paths: Sequence[Path],
        image_size: ImageSize,
        *,
        batch_size: int = 16,
        max_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        dtype: torch.dtype = torch.float16,
        normalization: str = DEFAULT_NORMALIZATION,
        resize: str = "stretch",
    ) -> FeatureCache:
        """Run ``extractor`` once over ``paths`` and keep every layer's maps (``dtype``, float16 by default).

        Images are resized (``image_size``, ``resize``) and normalised as a detector with these parameters
        would (:mod:`defectscope.data.geometry`, :mod:`defectscope.features.normalization`).
        """
        mean, std = input_stats(normalization, extractor.mean, extractor.std)
        paths = [Path(p) for p in paths]
        n = len(paths)
        h_in, w_in = input_shape(image_size)
        per_image = sum(
            c * (h_in // s) * (w_in // s) * dtype.itemsize for c, s in zip(extractor.channels, extractor.strides)
        )
        if per_image * n > max_bytes:
            raise DefectscopeError(
                f"caching {len(extractor.layers)} layers for {n} images needs about {per_image * n / 2**30:.1f} GiB "
                f"(limit {max_bytes / 2**30:.1f} GiB): search fewer stages, a smaller --image-size or fewer images"
            )
        maps: dict[str, torch.Tensor] = {}
        kept: list[Path] = []
        placements: list[Placement] = []
        failures: list[tuple[Path, str]] = []
        start = time.perf_counter()
        passes = 0
        with torch.inference_mode():
            for batch in iter_batches(paths, image_size, mean, std, batch_size=batch_size, resize=resize):
                failures.extend(batch.failures)
                if not len(batch.paths):
                    continue
                feats = extractor(batch.images)
                passes += 1
                for name, f in zip(extractor.layers, feats):
                    if name not in maps:
                        maps[name] = torch.empty((n, *f.shape[1:]), dtype=dtype)
                    maps[name][len(kept) : len(kept) + f.shape[0]] = f.to(dtype)
                kept.extend(batch.paths)
                placements.extend(batch.placements)
        maps = {k: v[: len(kept)].clone() if len(kept) < n else v for k, v in maps.items()}
        return cls(
            extractor.backbone,
            kept,
            maps,
            dict(zip(extractor.layers, extractor.strides)),
            extractor.mean,
            extractor.std,
            extractor.weights_info,
            time.perf_counter() - start,
            passes,
            failures,
            placements,
        )

    def rows(self, paths: Sequence[Path]) -> list[int]:
        """Cache rows of ``paths`` (those that loaded)."""
        index = {p: i for i, p in enumerate(self.paths)}
        return [index[Path(p)] for p in paths if Path(p) in index]


# --------------------------------------------------------------------------- evaluation
@dataclass
class Scored:
    """Image and pixel AUROC of one detector on one labelled set, and the seconds it took."""

    image_auroc: float | None
    pixel_auroc: float | None
    seconds: float


def _labelled(cache: FeatureCache, samples: Sequence[Sample]) -> tuple[list[int], np.ndarray, list[np.ndarray] | None]:
    """Cache rows, labels (N,) and bool masks (None when a defective image lacks one), each over its
    photo at the shape of its map over the photo (:meth:`~defectscope.data.geometry.Placement.to_photo_frame`)."""
    loaded = {p: i for i, p in enumerate(cache.paths)}
    kept = [s for s in samples if Path(s.path) in loaded]
    rows = [loaded[Path(s.path)] for s in kept]
    labels = np.array([s.label for s in kept], dtype=np.int64)
    if any(s.label == 1 and s.mask_path is None for s in kept) or not (labels == 1).any():
        return rows, labels, None
    shapes = [cache.placements[row].resized for row in rows]
    masks = [
        load_mask(s.mask_path, size=shape) if s.mask_path is not None else np.zeros(shape, bool)
        for s, shape in zip(kept, shapes)
    ]
    return rows, labels, masks


def score_detector(
    detector: Detector,
    rows: list[int],
    labels: np.ndarray,
    masks: list[np.ndarray] | None,
    batch_size: int = 16,
    placements: Sequence[Placement] | None = None,
) -> tuple[float | None, float | None]:
    """(image AUROC, pixel AUROC or None) of a detector fed cached images ``rows``.

    placements: per cache row, where its image lies in the model input; each map is taken back over
    its photo before it meets its mask (None: maps and masks compared as they are).
    """
    pixel = metrics.PixelMetrics() if masks is not None else None
    scores: list[np.ndarray] = []
    done = 0
    for batch in tokens(rows, batch_size):
        pred = detector.predict(batch)
        scores.append(pred.scores)
        if pixel is not None and placements is None:
            pixel.add(pred.maps, np.stack(masks[done : done + len(pred)]))
        elif pixel is not None:
            for j, row in enumerate(rows[done : done + len(pred)]):
                pixel.add(placements[row].to_photo_frame(pred.maps[j])[None], masks[done + j][None])
        done += len(pred)
    s = np.concatenate(scores) if scores else np.zeros(0)
    return metrics.image_auroc(labels, s), (pixel.auroc() if pixel is not None else None)


@dataclass
class TuneResult:
    """Everything ``tune`` found. rows are ranked best first (validation metrics)."""

    method: str
    backbone: str
    stages: list[str]
    space_size: int
    search: str
    rows: list[dict[str, Any]]
    best: list[str]
    validation: dict[str, Any]
    held_out: dict[str, Any]
    extract_seconds: float
    backbone_passes: int
    n_images: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tune_layers(
    method: str,
    train: Sequence[Path],
    validation: Sequence[Sample],
    held_out: Sequence[Sample],
    *,
    params: dict[str, Any] | None = None,
    stages: Sequence[str] | None = None,
    max_trials: int | None = None,
    search: str = "random",
    validation_source: str = "",
    batch_size: int = 16,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    announce: Callable[[str], None] | None = None,
) -> TuneResult:
    """Rank layer combinations of ``method`` on ``validation``; report the winner on ``held_out``.

    params: the detector's other parameters (backbone, image_size, weights, seed, ...).
    announce: called once with the search space listing (:func:`describe_space`) before any work.
    """
    params = dict(params or {})
    params.pop("layers", None)
    probe = make_detector(method, **params)
    backbone, seed = probe.backbone, probe.seed
    stages = list(stages) if stages else default_stages(backbone, method)
    space = search_space(backbone, stages)
    trials = choose_trials(space, max_trials, search, seed)
    if announce is not None:
        announce(describe_space(backbone, stages, space, trials, search))
    if len(train) < probe.min_train_images:
        raise DataLayoutError(f"tune: {len(train)} training image(s), {method} needs at least {probe.min_train_images}")
    check_image_size(probe.image_size)  # a bad input size or protocol fails before the backbone runs
    check_resize(probe.resize)
    needed = sorted({name for t in trials for name in t})
    extractor = build_extractor(backbone, needed, weights=probe.weights, normalization=probe.normalization)
    images = list(dict.fromkeys([Path(p) for p in train] + [Path(s.path) for s in (*validation, *held_out)]))
    cache = FeatureCache.build(
        extractor,
        images,
        probe.image_size,
        batch_size=batch_size,
        max_bytes=max_cache_bytes,
        normalization=probe.normalization,
        resize=probe.resize,
    )
    del extractor
    for path, message in cache.failures:
        log.warning("tune: skipping %s", message if str(path) in message else f"{path}: {message}")
    train_rows = cache.rows(train)
    val_rows, val_labels, val_masks = _labelled(cache, validation)
    if not ((val_labels == 0).any() and (val_labels == 1).any()):
        raise DataLayoutError("tune: the validation images need both good and defective images")

    rows: list[dict[str, Any]] = []
    for i, layers in enumerate(trials):
        start = time.perf_counter()
        detector = _fit_cached(method, params, cache, layers, train_rows, batch_size)
        image_auc, pixel_auc = score_detector(detector, val_rows, val_labels, val_masks, batch_size, cache.placements)
        seconds = time.perf_counter() - start
        log.info(
            "tune [%d/%d] %s: image AUROC %s, pixel AUROC %s, %.1f s",
            i + 1,
            len(trials),
            ",".join(layers),
            image_auc,
            pixel_auc,
            seconds,
        )
        rows.append(
            {
                "layers": ",".join(layers),
                "image_auroc": image_auc,
                "pixel_auroc": pixel_auc,
                "seconds": round(seconds, 3),
            }
        )
    # rank on validation only: image AUROC, then pixel AUROC, then speed
    rows.sort(key=lambda r: (-(r["image_auroc"] or 0.0), -(r["pixel_auroc"] or 0.0), r["seconds"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    best = rows[0]["layers"].split(",")

    test_rows, test_labels, test_masks = _labelled(cache, held_out)
    held: dict[str, Any] = {
        "n_images": len(test_rows),
        "n_defective": int(test_labels.sum()),
        "image_auroc": None,
        "pixel_auroc": None,
    }
    if test_rows:
        detector = _fit_cached(method, params, cache, best, train_rows, batch_size)
        held["image_auroc"], held["pixel_auroc"] = score_detector(
            detector, test_rows, test_labels, test_masks, batch_size, cache.placements
        )
    return TuneResult(
        method=method,
        backbone=backbone,
        stages=stages,
        space_size=len(space),
        search=search,
        rows=rows,
        best=best,
        validation={
            "source": validation_source,
            "n_images": len(val_rows),
            "n_defective": int(val_labels.sum()),
            "image_auroc": rows[0]["image_auroc"],
            "pixel_auroc": rows[0]["pixel_auroc"],
        },
        held_out=held,
        extract_seconds=round(cache.seconds, 3),
        backbone_passes=cache.passes,
        n_images=len(cache.paths),
    )


def _fit_cached(
    method: str,
    params: dict[str, Any],
    cache: FeatureCache,
    layers: Sequence[str],
    train_rows: list[int],
    batch_size: int,
) -> Detector:
    """A detector of ``method`` with ``layers`` fitted from the cache."""
    extra = {"global_layer": "maps"} if method == "spade" else {}  # the cache holds the searched stages only
    detector = make_detector(method, **dict(params, layers=list(layers), **extra))
    detector.set_extractor(CachedFeatures(cache, layers))  # type: ignore[arg-type]
    return detector.fit(tokens(train_rows, batch_size))


# --------------------------------------------------------------------------- output
def describe_space(
    backbone: str,
    stages: Sequence[str],
    space: Sequence[tuple[str, ...]],
    trials: Sequence[tuple[str, ...]],
    search: str,
) -> str:
    """The search space: stages, the block choices per stage, its size, and the candidates to run."""
    table = stage_blocks(backbone)
    lines = [
        f"search space on {backbone}: {len(space)} candidates = every non-empty set of stages "
        f"{', '.join(stages)} x one block per stage"
    ]
    for s in stages:
        choices = ([*table[s][:-1], s]) if table[s] else [s]
        lines.append(f"  {s}: {', '.join(choices)}")
    lines.append(f"evaluating {len(trials)} of {len(space)} ({search}):")
    lines.extend(f"  {','.join(t)}" for t in trials)
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown_table(result: TuneResult) -> str:
    """The ranked table (validation metrics) and the winner's held-out result, as Markdown."""
    lines = [
        f"{result.method} on {result.backbone}: {len(result.rows)} of {result.space_size} candidates "
        f"({result.search}), stages {', '.join(result.stages)}; ranked on {result.validation['source']} "
        f"({result.validation['n_images']} images, {result.validation['n_defective']} defective)",
        "",
        "| rank | layers | image AUROC | pixel AUROC | seconds |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r['rank']} | {r['layers']} | {_f(r['image_auroc'])} | {_f(r['pixel_auroc'])} | {r['seconds']:.1f} |"
        )
    h = result.held_out
    lines += [
        "",
        f"Chosen: {','.join(result.best)}. On the held-out test images ({h['n_images']} images, "
        f"{h['n_defective']} defective, not used for the choice): image AUROC {_f(h['image_auroc'])}, "
        f"pixel AUROC {_f(h['pixel_auroc'])}.",
        f"Features: {result.backbone_passes} backbone passes over {result.n_images} images in "
        f"{result.extract_seconds:.1f} s (shared by all candidates; not in the seconds column).",
    ]
    return "\n".join(lines)


def write_csv(result: TuneResult, path: Path) -> None:
    """rank,layers,image_auroc,pixel_auroc,seconds (validation), one row per candidate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "layers", "image_auroc", "pixel_auroc", "seconds"])
        for r in result.rows:
            writer.writerow([r["rank"], r["layers"], r["image_auroc"], r["pixel_auroc"], r["seconds"]])
