"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features from mid-level layers, a greedy k-center coreset of all
training patches as the memory bank, nearest-neighbour patch distances as the anomaly
map and the re-weighted maximum patch distance as the image score (paper eq. 7). With a region of
interest (:meth:`~defectscope.detectors.base.Detector.set_roi`) the maximum runs over the patches
inside it only (:meth:`PatchCore.roi_patches`) and the map is 0 outside it.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..common.progress import progress_bar
from ..components.coreset import KCenterResult, kcenter
from ..components.embedding import (
    BORDER_PADDINGS,
    LAYER_WEIGHTINGS,
    check_choice,
    concat_layers,
    local_average,
    weigh_layers,
)
from ..components.feature_store import FeatureStore
from ..components.knn import BACKENDS, INDEXES, NearestNeighbors
from ..components.rotation import rotate_images, rotation_angles
from ..components.tiling import TileGrid, tile_grid
from ..data.geometry import MAX_SIDE, ImageSize, check_image_size, input_shape, size_text
from ..errors import DefectscopeError
from ..features.normalization import PATCHCORE_NORMALIZATION
from .base import Detector, gaussian_blur

log = logging.getLogger(__name__)

#: PatchCore's default model input side (px) and layer weighting, decided together on the development
#: suite's mean in version 0.1.0 (docs/benchmarks.md); PaDiM and SPADE keep the base 256 px
PATCHCORE_IMAGE_SIZE = 288
PATCHCORE_LAYER_WEIGHTING = "equal"

#: coreset selections: per-fold chunks (linear, default) or one greedy over all patches
CORESETS = ("folds", "exact")


def top_k_mean(dist: torch.Tensor, k: int) -> torch.Tensor:
    """The mean of the k largest of each row of ``dist`` (B, P) -> (B,); entries of -inf (patches outside
    a region of interest) are left out of the mean, and a row with none left scores 0."""
    top = dist.topk(min(k, dist.shape[1]), dim=1).values
    finite = torch.isfinite(top)
    return top.where(finite, torch.zeros_like(top)).sum(dim=1) / finite.sum(dim=1).clamp_min(1)


class PatchCore(Detector):
    """PatchCore anomaly detector.

    Parameters (besides the base ones; ``image_size`` defaults to :data:`PATCHCORE_IMAGE_SIZE`, 288 px):
        coreset_ratio: fraction of all training patches kept in the memory bank (paper: 1-10 %).
        coreset_eps: Johnson-Lindenstrauss epsilon that sets the random-projection dimension used
            while selecting the coreset; ignored when ``projection_dim`` is given.
        projection_dim: explicit random-projection dimension for the coreset selection.
        max_bank_size: most memory-bank entries, whatever the number of training patches (None: no
            cap). The paper keeps a fixed ratio, so its bank, its fit time (quadratically) and its
            predict time grow with the training set; the cap (32,768 entries: bottle and pill at
            10 % stay below it) keeps predict at the same speed for 3,000 images as for 300.
        coreset: "folds" (default) or "exact". folds: the training images are dealt at random
            into ``folds`` folds, each fold split into chunks of at most 2^19 patches, and the
            greedy k-center runs in each chunk for its share of the bank; the bank is the union.
            Linear in the number of images, and each fold's entries are chosen without the other
            folds' images, which gives the threshold its held-out banks for free. exact: one
            greedy k-center over all patches (Alg. 1 as written; quadratic time, all patches in
            memory); its held-out banks are selected anew per fold.
        folds: number of folds k for the selection and the k-fold threshold (default 5).
        threshold_images: most training images scored (held out) for the threshold; a seeded
            sample when there are more.
        num_neighbors: b, the memory-bank neighbourhood used to re-weight the image score (eq. 7).
        patch_size: side of the local neighbourhood aggregated into each patch feature (paper: p = 3).
        border_padding: "zeros" (default; the reference implementation's zero padding, border cells
            averaged over all p x p) or "exclude" (averaged over the cells inside the map); see
            :func:`~defectscope.components.embedding.local_average`.
        layer_weighting: "equal" (default; every layer counts alike in a patch distance, as the
            reference implementation's per-layer mapping to a common dimension does) or "channels"
            (every channel counts once, so lite0's 112-channel blocks.4 outweighs its 40-channel
            blocks.2; anomalib's concatenation, and what model files from before this parameter used);
            see :func:`~defectscope.components.embedding.weigh_layers`. Measured on the development
            suite (README): "equal" gives better maps (pixel AUROC, AUPRO) at 256 and 288 px and a higher
            five-set image AUROC mean at 288 px, though not on every set.
        target_dim: optional final feature dimension (adaptive average pooling over channels, as in
            the reference implementation); None keeps all concatenated channels.
        knn_backend: "faiss" or "torch" (exact, chunked brute force).
        knn_index: the faiss index searched at predict time: "flat" (exact, default), "ivf" or
            "hnsw" (approximate, faster on large banks; recall measured in benchmarks/bench_knn.py).
            Held-out threshold scores use the same index type, so the threshold matches what
            predict computes.
        rotations: R, the number of evenly spaced angles (0, 360/R, 2 x 360/R, ... degrees) at which
            every training image enters the memory bank (1: as given, the default). An alternative
            to alignment for parts photographed at any angle: each preprocessed (normalised) input
            tensor is turned about its centre (quarter turns of the square input exactly, other
            angles bilinearly with border padding; see components/rotation.py) and its patches are
            added as those of the same image. Every copy therefore stays in its source image's fold
            (bank_image_ names the source), so the fold bank used for an image's held-out score
            holds none of its copies; held-out images are scored as given (angle 0 only), as a test
            image is at predict time. Rotations multiply the training patches by R before the bank
            size rule: ``coreset_ratio`` keeps R times more entries until ``max_bank_size`` caps
            them, so with the cap each orientation gets about 1/R of the bank (coarser coverage);
            each fold's share stays proportional to its images, copies included. Feature
            extraction and the coreset take about R (up to R^2 under the cap) times longer;
            predict searches an up to R times larger bank, and costs the same once it is capped.
        tiles: N, tiles per side (1: no tiling, the default). For high-resolution photos with small
            defects: the photo is resized to a canvas of N x N tiles of ``image_size`` overlapping
            by ``tile_overlap`` (components/tiling.py), each tile is a separate input to the backbone,
            the tiles' patch distances are upsampled to the tile, put back on the canvas and averaged
            where tiles overlap, then blurred; the image score is the largest tile score. All of a
            training image's tiles (and their rotated copies) enter the bank as that image's patches
            and stay in its fold; its held-out score is the largest of its tiles' held-out scores.
            :attr:`input_shape` (and so every map) is the canvas. Costs about N^2 times the features.
        tile_overlap: fraction of a tile shared with its neighbour, in [0, 0.9] (default 0.25; only
            used with tiles >= 2).
        score_patches: k, how many patches make the image score: 1 (default) the largest patch distance,
            re-weighted by its memory-bank neighbourhood (eq. 7); k >= 2 the mean of the k largest patch
            distances, not re-weighted (a top-k mean; measured against the max on the development suite in
            docs/benchmarks.md, "Score aggregation and region rules"). The held-out threshold scores use the
            same rule.

    The threshold's training scores are k-fold held-out scores: each scored image is compared
    with the bank fitted without its fold (see :meth:`_held_out_scores`).
    """

    method = "patchcore"
    grid_: tuple[int, int]
    training_map_max_: torch.Tensor | None
    _index: NearestNeighbors | None
    training_scores_kind = "k-fold held-out (each image against the bank fitted without its fold)"

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: list[str] | None = None,
        image_size: ImageSize = PATCHCORE_IMAGE_SIZE,
        resize: str = "stretch",
        weights: str | None = None,
        seed: int = 0,
        blur_sigma: float = 4.0,
        normalization: str = PATCHCORE_NORMALIZATION,
        coreset_ratio: float = 0.1,
        coreset_eps: float | None = 0.9,
        projection_dim: int | None = None,
        max_bank_size: int | None = 32768,
        coreset: str = "folds",
        folds: int = 5,
        threshold_images: int = 500,
        num_neighbors: int = 9,
        patch_size: int = 3,
        border_padding: str = "zeros",
        layer_weighting: str = PATCHCORE_LAYER_WEIGHTING,
        target_dim: int | None = None,
        knn_backend: str = "faiss",
        knn_index: str = "flat",
        rotations: int = 1,
        tiles: int = 1,
        tile_overlap: float = 0.25,
        score_patches: int = 1,
    ) -> None:
        super().__init__(
            backbone=backbone,
            layers=layers,
            image_size=image_size,
            resize=resize,
            weights=weights,
            seed=seed,
            blur_sigma=blur_sigma,
            normalization=normalization,
        )
        self.coreset_ratio = coreset_ratio
        self.coreset_eps = coreset_eps
        self.projection_dim = projection_dim
        self.max_bank_size = max_bank_size
        self.coreset = coreset
        self.folds = folds
        self.threshold_images = threshold_images
        self.num_neighbors = num_neighbors
        self.patch_size = patch_size
        self.border_padding = border_padding
        self.layer_weighting = layer_weighting
        self.target_dim = target_dim
        self.knn_backend = knn_backend
        self.knn_index = knn_index
        self.rotations = rotations
        self.tiles = tiles
        self.tile_overlap = tile_overlap
        self.score_patches = score_patches

    def _validate_params(self) -> None:
        super()._validate_params()
        if not 0 < self.coreset_ratio <= 1:
            raise DefectscopeError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_eps is not None and not 0 < self.coreset_eps < 1:  # jl_dim's range
            raise DefectscopeError(f"coreset_eps must be in (0, 1), got {self.coreset_eps}")
        if self.max_bank_size is not None and self.max_bank_size < 1:
            raise DefectscopeError(f"max_bank_size must be a positive integer or None, got {self.max_bank_size}")
        if self.coreset not in CORESETS:
            raise DefectscopeError(f"coreset must be one of {', '.join(CORESETS)}, got {self.coreset!r}")
        if self.folds < 2:
            raise DefectscopeError(f"folds must be >= 2 (the threshold holds one fold out), got {self.folds}")
        if self.coreset == "folds" and self.max_bank_size is not None and self.max_bank_size < self.folds:
            raise DefectscopeError(
                f"max_bank_size={self.max_bank_size} is below folds={self.folds}: every fold needs "
                "at least one memory-bank entry; raise max_bank_size or lower folds"
            )
        if self.threshold_images < 1:
            raise DefectscopeError(f"threshold_images must be >= 1, got {self.threshold_images}")
        if self.num_neighbors < 1:
            raise DefectscopeError(f"num_neighbors must be >= 1, got {self.num_neighbors}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise DefectscopeError(f"patch_size must be a positive odd integer, got {self.patch_size}")
        check_choice("border_padding", self.border_padding, BORDER_PADDINGS)
        check_choice("layer_weighting", self.layer_weighting, LAYER_WEIGHTINGS)
        if self.knn_backend not in BACKENDS:
            raise DefectscopeError(f"knn_backend must be one of {', '.join(BACKENDS)}, got {self.knn_backend!r}")
        if self.knn_index not in INDEXES:
            raise DefectscopeError(f"knn_index must be one of {', '.join(INDEXES)}, got {self.knn_index!r}")
        if self.knn_index != "flat" and self.knn_backend != "faiss":
            raise DefectscopeError(f"knn_index={self.knn_index!r} needs knn_backend='faiss'")
        if (
            isinstance(self.rotations, bool)
            or not isinstance(self.rotations, numbers.Integral)
            or not 1 <= self.rotations <= 360
        ):
            raise DefectscopeError(
                f"rotations must be an integer between 1 and 360 (evenly spaced angles), got {self.rotations!r}"
            )
        self.rotations = int(self.rotations)
        canvas = self.tile_grid.canvas  # tiles and overlap checked by tile_grid
        self.tiles, self.tile_overlap = int(self.tiles), float(self.tile_overlap)  # numpy numbers: JSON-ready
        if self.tiles > 1 and max(canvas) > MAX_SIDE:
            raise DefectscopeError(
                f"{self.tiles} x {self.tiles} tiles of {size_text(self.image_size)} overlapping by "
                f"{self.tile_overlap} make a {size_text(canvas)} canvas, over the {MAX_SIDE} px "
                "limit: use fewer tiles, a smaller image size or more overlap"
            )
        check_image_size(canvas)
        if isinstance(self.score_patches, bool) or not isinstance(self.score_patches, numbers.Integral):
            raise DefectscopeError(f"score_patches must be a whole number >= 1, got {self.score_patches!r}")
        if self.score_patches < 1:
            raise DefectscopeError(f"score_patches must be a whole number >= 1, got {self.score_patches!r}")
        self.score_patches = int(self.score_patches)
        if self.target_dim is not None and self.target_dim < 1:
            raise DefectscopeError(f"target_dim must be a positive integer, got {self.target_dim}")

    # ------------------------------------------------------------------ tiles
    @property
    def tile_grid(self) -> TileGrid:
        """The N x N tiles (of ``image_size``) the model input is cut into; N = 1 without tiling."""
        return tile_grid(input_shape(self.image_size), self.tiles, self.tile_overlap)

    @property
    def input_shape(self) -> tuple[int, int]:
        """(H_in, W_in) of the model input: ``image_size``, or with tiles the canvas they are cut from."""
        return self.tile_grid.canvas

    def _tile_maps(self, patch_maps: torch.Tensor) -> torch.Tensor:
        """(B x T, h, w) patch distances of each tile -> (B, H_in, W_in) maps: each tile's upsampled
        bilinearly to the tile, the tiles stitched onto the canvas (overlaps averaged), then blurred.
        Without tiles this is :meth:`Detector._finish_maps`."""
        grid = self.tile_grid
        up = F.interpolate(patch_maps.unsqueeze(1), size=grid.tile, mode="bilinear", align_corners=False).squeeze(1)
        return gaussian_blur(grid.stitch(up), self.blur_sigma)

    # ------------------------------------------------------------------ features
    def _patch_features(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, h, w, D) locally aware patch features.

        Each layer's map is averaged over a p x p neighbourhood (paper eq. 2-3, stride 1),
        deeper layers are upsampled to the finest layer's grid and everything is concatenated.
        Border neighbourhoods follow ``border_padding`` (zero-padded by default, as the paper's
        reference implementation does).
        """
        maps = local_average(self._features(batch), self.patch_size, self.border_padding)
        maps = weigh_layers(maps, self.layer_weighting)
        feats = concat_layers(maps, mode="bilinear")  # (B, D, h, w)
        feats = feats.permute(0, 2, 3, 1)
        if self.target_dim is not None and self.target_dim < feats.shape[-1]:
            b, h, w, d = feats.shape
            feats = F.adaptive_avg_pool1d(feats.reshape(-1, 1, d), self.target_dim).reshape(b, h, w, self.target_dim)
        return feats.contiguous()

    # ------------------------------------------------------------------ fit
    def _fit(self, batches: Iterator[torch.Tensor]) -> None:
        # Stream: each batch's patch features go to a temporary file as they are computed, so memory
        # holds one batch during extraction, then one chunk of patches at a time for the coreset
        # (all of them in exact mode), then one held-out image at a time for the threshold scores.
        # See components/feature_store.py.
        store: FeatureStore | None = None
        grid: tuple[int, int] | None = None
        angles = rotation_angles(self.rotations)
        tiling = self.tile_grid
        try:
            for batch in batches:
                # image-major rows: image i's first tile at angle 0, then at each further angle, then its
                # next tile ..., then image i + 1's; an image's copies (tiles x angles) are one contiguous
                # run, so they travel (and fold) together
                tiles = tiling.split(batch)  # (B x T, 3, t_h, t_w)
                feats = torch.stack([self._patch_features(rotate_images(tiles, a)) for a in angles], dim=1)
                if store is None:
                    store = FeatureStore(feats.shape[-1])
                    grid = (feats.shape[2], feats.shape[3])
                    self._check_roi_patches(grid)  # after one batch: before the long work
                store.append(feats.reshape(-1, feats.shape[-1]))  # (B x T x R x h x w, D)
                del feats
            if store is None or grid is None:
                raise DefectscopeError("PatchCore.fit got no images")
            self._fit_from_store(store, grid)
        finally:
            if store is not None:
                store.close()

    # ------------------------------------------------------------------ region of interest
    def roi_patches(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """(T, h x w) bool: the patches of each of the T tiles that count for the image score, or None
        without a region of interest. Patch (i, j) of the (h, w) grid stands for the cell (i, j) of the
        tile cut into h x w cells (adaptive average pooling); it counts when at least half of its cell
        lies inside the region."""
        if self.roi_ is None:
            return None
        tiles = self.tile_grid.split(self.roi_.to(torch.float32)[None, None])  # (T, 1, t_h, t_w)
        share = F.adaptive_avg_pool2d(tiles, grid)  # (T, 1, h, w): the region's share of each cell
        return (share >= 0.5).reshape(tiles.shape[0], grid[0] * grid[1])

    def _check_roi_patches(self, grid: tuple[int, int]) -> None:
        inside = self.roi_patches(grid)
        if inside is not None and not bool(inside.any()):
            t_h, t_w = self.tile_grid.tile
            raise DefectscopeError(
                f"the region of interest covers no patch: none of the {grid[0]}x{grid[1]} patch cells of the "
                f"{t_w}x{t_h} input (about {t_h / grid[0]:.0f} px each) is at least half inside it; make it larger"
            )

    def bank_size_for(self, n_patches: int) -> int:
        """Memory-bank entries for ``n_patches`` training patches: min(ceil(ratio x patches), max_bank_size)."""
        size = max(1, math.ceil(self.coreset_ratio * n_patches))
        return size if self.max_bank_size is None else min(size, self.max_bank_size)

    def _fit_from_store(self, store: FeatureStore, grid: tuple[int, int]) -> None:
        # per_image: the rows of one training image, all its tiles and rotated copies included (the unit
        # that folds, chunks and bank_image_ count in); see _fit for their order
        per_image = grid[0] * grid[1] * self.rotations * self.tile_grid.count
        n_patches = len(store)
        n = n_patches // per_image
        folds = self._image_folds(n)
        n_select = self.bank_size_for(n_patches)
        log.info(
            "PatchCore: %s coreset of %d of %d patches (%d images x %d tiles x %d angles, %dx%d grid, %d dims, "
            "%d folds)",
            self.coreset,
            n_select,
            n_patches,
            n,
            self.tile_grid.count,
            self.rotations,
            grid[0],
            grid[1],
            store.dim,
            int(folds.max()) + 1,
        )
        t0 = time.perf_counter()
        with progress_bar(n_select, "coreset", self._show_progress, unit="centre") as bar:
            if self.coreset == "exact":
                selection = self._exact_selection(store, per_image, n_select, bar)
            else:
                selection = self._fold_selection(store, per_image, folds, n_select, bar)
        self.fit_timings_ = {"coreset_s": time.perf_counter() - t0}
        self.memory_bank_ = selection.bank
        self.bank_image_ = selection.bank_image
        self.grid_ = grid
        self.n_train_ = n
        self._index = None
        self.fit_details_ = {
            "coreset": self.coreset,
            "n_patches": int(n_patches),
            "n_selected": int(selection.bank.shape[0]),
            "bank_size_rule": f"min(ceil({self.coreset_ratio} x patches), {self.max_bank_size})",
            "n_chunks": selection.n_chunks,
            "n_folds": int(folds.max()) + 1,
            "rotations": self.rotations,  # n_patches counts every rotated copy and every tile
            "tiles": self.tile_grid.count,
            # every training patch lies within this distance of a bank entry (measured to the entry
            # chosen from its own chunk: an upper bound in default mode, exact in exact mode)
            "coverage_radius": selection.radius,
            "radius_space": "projection" if selection.projected else "features",
        }
        t0 = time.perf_counter()
        scored = self._threshold_images(n)
        self.training_scores_ = self._held_out_scores(store, per_image, folds, scored, selection)
        self.fit_timings_["threshold_s"] = time.perf_counter() - t0
        self.fit_details_["n_threshold_images"] = int(scored.numel())
        self.threshold_image_index_ = scored

    def _image_folds(self, n: int) -> torch.Tensor:
        """(n,) fold of each training image: a seeded shuffle dealt into min(folds, n) folds
        (fewer images than folds: one image per fold; ``training.details.n_folds`` records it)."""
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        folds = torch.empty(n, dtype=torch.int64)
        folds[order] = torch.arange(n) % min(self.folds, n)
        return folds

    def _threshold_images(self, n: int) -> torch.Tensor:
        """Sorted indices of the training images scored for the threshold (all, or a seeded sample)."""
        if n <= self.threshold_images:
            return torch.arange(n)
        gen = torch.Generator().manual_seed(self.seed + 1)
        return torch.randperm(n, generator=gen)[: self.threshold_images].sort().values

    def _select(self, pool: torch.Tensor, k: int, bar: Any | None) -> KCenterResult:
        return kcenter(pool, k, eps=self.coreset_eps, projection_dim=self.projection_dim, seed=self.seed, bar=bar)

    def _fold_selection(
        self, store: FeatureStore, per_image: int, folds: torch.Tensor, n_select: int, bar: Any
    ) -> _Selection:
        """Greedy k-center per chunk of images, each chunk inside one fold; the bank is their union.

        A chunk holds at most ``CHUNK_PATCHES`` patches and chooses its share of the bank in
        proportion to its patches. Cost: (patches) x (bank size / chunks) x (dims), linear in
        the number of images once the bank size is capped. A fold's images never influence
        which entries the other folds chose, so the bank without a fold's entries is a bank
        fitted without those images: that is what the threshold's held-out scores use.
        """
        chunks: list[torch.Tensor] = []
        for f in range(int(folds.max()) + 1):
            images = (folds == f).nonzero().squeeze(1)
            n_parts = max(1, math.ceil(images.numel() * per_image / CHUNK_PATCHES))
            chunks += [part for part in torch.tensor_split(images, n_parts) if part.numel()]
        if n_select < len(chunks):  # a tiny ratio or cap: every chunk (and so every fold) keeps one entry
            log.info("PatchCore: bank raised from %d to %d entries, one per chunk", n_select, len(chunks))
            n_select = len(chunks)
        banks, owners, radius, projected = [], [], 0.0, False
        for images, k in zip(chunks, _shares(n_select, [c.numel() * per_image for c in chunks])):
            if k == 0:
                continue
            pool = store.read_runs((images * per_image).tolist(), per_image).reshape(-1, store.dim)
            result = self._select(pool, k, bar)
            banks.append(pool[result.indices].clone())
            owners.append(images[result.indices // per_image])
            radius = max(radius, float(result.sq_dist.max().clamp_min(0).sqrt()))
            projected = projected or result.projected
            del pool
        bank_image = torch.cat(owners)
        return _Selection(torch.cat(banks), bank_image, len(chunks), radius, projected, exact=False)

    def _exact_selection(self, store: FeatureStore, per_image: int, n_select: int, bar: Any) -> _Selection:
        """One greedy k-center over all training patches (the paper's method; memory grows with N)."""
        pool = store.read()
        result = self._select(pool, n_select, bar)
        bank = pool[result.indices].contiguous()
        radius = float(result.sq_dist.max().clamp_min(0).sqrt())
        return _Selection(bank, result.indices // per_image, 1, radius, result.projected, exact=True)

    def _fold_bank(
        self, store: FeatureStore, per_image: int, folds: torch.Tensor, fold: int, selection: _Selection
    ) -> torch.Tensor:
        """The memory bank fitted without the images of ``fold`` (M_f, D)."""
        if not selection.exact:  # fold selection: the other folds' entries
            return selection.bank[folds[selection.bank_image] != fold].contiguous()
        # exact selection: select again over the other folds' patches, at the same bank-size rule
        others = (folds != fold).nonzero().squeeze(1)
        pool = store.read_runs((others * per_image).tolist(), per_image).reshape(-1, store.dim)
        result = self._select(pool, min(self.bank_size_for(pool.shape[0]), pool.shape[0]), None)
        return pool[result.indices].contiguous()

    def _held_out_scores(
        self, store: FeatureStore, per_image: int, folds: torch.Tensor, scored: torch.Tensor, selection: _Selection
    ) -> torch.Tensor:
        """Scores (T,) of the ``scored`` training images, each against the bank fitted without its fold.

        This is k-fold cross-validation over images: a scored image had no say in the bank it
        is compared with, as with an unseen good part at predict time, so the threshold taken
        from these scores is not optimistic. ``per_image`` counts an image's tiles and rotated copies
        too; each tile is scored as given (angle 0), and the image's score is its largest tile score,
        as at predict time, inside the region of interest when there is one (its map maximum too).
        """
        n_grid = self.grid_[0] * self.grid_[1]
        n_tiles = self.tile_grid.count
        inside = self.roi_patches(self.grid_)  # (T, P) or None
        scores = torch.empty(scored.numel(), dtype=torch.float32)
        map_max = torch.empty(scored.numel(), dtype=torch.float32)
        grids = torch.empty(scored.numel(), n_tiles, *self.grid_, dtype=torch.float32)
        with progress_bar(scored.numel(), "threshold", self._show_progress) as bar:
            for fold in range(int(folds.max()) + 1):
                mine = (folds[scored] == fold).nonzero().squeeze(1)
                if not mine.numel():
                    continue
                bank = self._fold_bank(store, per_image, folds, fold, selection)
                if bank.shape[0] == 0:
                    raise DefectscopeError("PatchCore: a fold's bank is empty; fit on more images")
                index = NearestNeighbors(bank, backend=self.knn_backend, index=self.knn_index, seed=self.seed)
                for pos in mine.tolist():
                    image = int(scored[pos])
                    rows = store.read(image * per_image, (image + 1) * per_image)
                    patches = rows.reshape(n_tiles, self.rotations, n_grid, -1)[:, 0].contiguous()  # (T, P, D)
                    dist, nn_idx = index.search(patches.reshape(-1, patches.shape[-1]), 1)
                    dist, nn_idx = dist[:, 0].reshape(n_tiles, n_grid), nn_idx[:, 0].reshape(n_tiles, n_grid)
                    scores[pos] = self._image_scores(patches, dist, nn_idx, bank, index, inside).max()
                    grids[pos] = dist.reshape(n_tiles, *self.grid_)
                    map_max[pos] = self._roi_maps(self._tile_maps(grids[pos])).max()
                    bar.update(1)
        self.training_map_max_ = map_max
        self.training_grids_ = grids  # (T, tiles, h, w), for rules judged on held-out maps; not saved
        return scores

    # ------------------------------------------------------------------ predict
    @property
    def index(self) -> NearestNeighbors:
        """Nearest-neighbour index over the memory bank (built lazily, not saved)."""
        index = getattr(self, "_index", None)
        if index is None:
            index = self._index = NearestNeighbors(
                self.memory_bank_, backend=self.knn_backend, index=self.knn_index, seed=self.seed
            )
        return index

    def _predict_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tiling = self.tile_grid
        feats = self._patch_features(tiling.split(batch))
        b, h, w, d = feats.shape  # b = images x tiles
        patches = feats.reshape(b, h * w, d)
        dist, nn_idx = self.index.search(patches.reshape(-1, d), 1)
        dist = dist[:, 0].reshape(b, h * w)
        nn_idx = nn_idx[:, 0].reshape(b, h * w)
        inside = self.roi_patches((h, w))
        if inside is not None:
            inside = inside.repeat(b // tiling.count, 1)  # (b, P): each image's tiles in order
        scores = self._image_scores(patches, dist, nn_idx, self.memory_bank_, self.index, inside)
        scores = scores.reshape(-1, tiling.count).amax(dim=1)  # an image scores as its worst tile
        maps = self._roi_maps(self._tile_maps(dist.reshape(b, h, w)))  # 0 outside a region of interest
        return scores, maps

    def _image_scores(
        self,
        patches: torch.Tensor,
        dist: torch.Tensor,
        nn_idx: torch.Tensor,
        bank: torch.Tensor,
        index: NearestNeighbors,
        inside: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Re-weighted image scores (paper eq. 7).

        patches (B, P, D) test patch features, dist (B, P) their nearest-neighbour distances,
        nn_idx (B, P) the index of that neighbour m* in ``bank`` (M, D), searched with ``index``. For the most anomalous
        patch m_test* (distance s*), with N_b(m*) the b nearest bank entries of m*:
            s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*
        The ratio is a softmax over those distances, computed stably in float64. ``inside`` (B, P) bool:
        m_test* is the most anomalous patch among those inside the region of interest; a row with none
        inside (a tile outside the region) scores 0.
        With ``score_patches`` k >= 2 the score is instead the mean of the k largest distances (all of
        them on a map of fewer patches; only those inside a region of interest), without re-weighting.
        """
        if inside is not None:
            scores = self._image_scores(patches, dist.masked_fill(~inside, float("-inf")), nn_idx, bank, index)
            return scores.masked_fill(~inside.any(dim=1), 0.0)
        if self.score_patches > 1:
            return top_k_mean(dist, self.score_patches)
        best = dist.argmax(dim=1)  # (B,)
        rows = torch.arange(dist.shape[0])
        s_star = dist[rows, best]
        m_test = patches[rows, best]  # (B, D)
        m_star = bank[nn_idx[rows, best]]  # (B, D)
        b = min(self.num_neighbors, bank.shape[0])
        if b < 2:
            return s_star
        _, neigh = index.search(m_star, b)  # (B, b), neigh[:, 0] is m* itself
        neighbours = bank[neigh]  # (B, b, D)
        d_neigh = torch.linalg.vector_norm(neighbours - m_test.unsqueeze(1), dim=-1).double()
        d_star = torch.linalg.vector_norm(m_star - m_test, dim=-1).double()
        # m* is normally its own first neighbour; mask it wherever it appears so it counts once.
        is_star = neigh == nn_idx[rows, best].unsqueeze(1)
        d_neigh = d_neigh.masked_fill(is_star, float("-inf"))
        logits = torch.cat([d_star.unsqueeze(1), d_neigh], dim=1)
        weight = 1.0 - torch.softmax(logits, dim=1)[:, 0]
        return (weight * s_star.double()).float()

    def _training_scores(self) -> torch.Tensor:
        return self.training_scores_

    def _training_map_maxima(self) -> torch.Tensor:
        maxima = getattr(self, "training_map_max_", None)
        if maxima is None:
            raise NotImplementedError("this PatchCore model was fitted before held-out map maxima were kept")
        return maxima

    def _training_maps(self, start: int, stop: int) -> torch.Tensor:
        grids = getattr(self, "training_grids_", None)
        if grids is None:  # a loaded model: held-out maps are made by the fit and not saved
            raise NotImplementedError("held-out anomaly maps exist only in the process that fitted the model")
        part = grids[start:stop]
        return self._roi_maps(self._tile_maps(part.reshape(-1, *self.grid_)))  # as at predict time

    def training_score_images(self) -> np.ndarray:
        index = getattr(self, "threshold_image_index_", None)
        if index is None:  # a loaded model: the images are not known any more, only their number
            return super().training_score_images()
        return index.numpy()

    # ------------------------------------------------------------------ state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        extra = {} if self.training_map_max_ is None else {"training_map_max": self.training_map_max_}
        return extra | {
            "memory_bank": self.memory_bank_,
            "bank_image": self.bank_image_,
            "grid": torch.tensor(self.grid_, dtype=torch.int64),
            "n_train": torch.tensor(self.n_train_, dtype=torch.int64),
            "training_scores": self.training_scores_,
        }

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.memory_bank_ = tensors["memory_bank"].float().contiguous()
        self.bank_image_ = tensors["bank_image"].long()
        rows, cols = (int(v) for v in tensors["grid"])
        self.grid_ = (rows, cols)
        self.training_scores_ = tensors["training_scores"].float()  # (T,) held-out scores
        self.n_train_ = int(tensors["n_train"])
        self.training_map_max_ = tensors["training_map_max"].float() if "training_map_max" in tensors else None
        self._index = None


#: most patches the default selection holds in memory at once (0.3 GB at 152 dims)
CHUNK_PATCHES = 1 << 19


@dataclass
class _Selection:
    """What a coreset selection produced: the bank (M, D), each entry's training image (M,),
    how many chunks it ran over, the coverage radius, and whether distances were projected.
    ``exact``: one selection over all patches, so the bank without a fold must be selected anew."""

    bank: torch.Tensor
    bank_image: torch.Tensor
    n_chunks: int
    radius: float
    projected: bool
    exact: bool


def _shares(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``sizes`` (largest remainder), each share at most its size."""
    whole = sum(sizes)
    exact = [total * size / whole for size in sizes]
    shares = [min(int(e), size) for e, size in zip(exact, sizes)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: shares[i] - exact[i])
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares
