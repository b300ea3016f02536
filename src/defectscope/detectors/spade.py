"""SPADE: kNN on global features, then pixel kNN against the nearest images (Cohen & Hoshen 2020).

Image level (paper sec. 3.1): the score is the mean Euclidean distance from the test image's
global feature to its k nearest training global features. The paper pools the network's final
layer; here the global feature is the global average pool of the deepest *chosen* layer, so the
two levels share one forward pass through the same layers.

Pixel level (sec. 3.2): the top_k nearest training images (by global feature) form a gallery
of all their patch embeddings (chosen layers upsampled to the finest one and concatenated);
each test position scores its distance to the nearest gallery embedding. The map is upsampled
and blurred to the input size.

Memory: the training embedding maps are stored as float16 (N x h x w x C x 2 bytes, e.g.
209 x 32*32 x 176 x 2 = 75 MB) and widened to float32 for each search; global features are
float32 (N x C_last x 4 bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from ..components.embedding import concat_layers, default_multiscale_layers
from ..components.knn import NearestNeighbors
from ..backbones import FeatureExtractor
from ..errors import DefectscopeError, ModelFileError
from .base import DEFAULT_BACKBONE, Detector

log = logging.getLogger(__name__)

__all__ = ["SPADE"]

_STATE_KEYS = ("train_global", "train_maps", "n_train")
#: storage type of the training embedding maps (halves the model; searches run in float32)
STORE_DTYPE = torch.float16


class SPADE(Detector):
    """Semantic Pyramid Anomaly Detection with ``k`` image-level and ``top_k`` pixel-level neighbours."""

    method = "spade"

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: list[str] | None = None,
        image_size: int = 256,
        weights: str | None = None,
        seed: int = 0,
        blur_sigma: float = 4.0,
        k: int = 50,
        top_k: int = 5,
    ) -> None:
        super().__init__(
            backbone=backbone,
            layers=layers,
            image_size=image_size,
            weights=weights,
            seed=seed,
            blur_sigma=blur_sigma,
        )
        self.k = k
        self.top_k = top_k
        self._global_index: NearestNeighbors | None = None

    # ----------------------------------------------------------------- backbone
    @property
    def extractor(self) -> FeatureExtractor:
        """The feature extractor; without explicit ``layers``, built with this method's defaults."""
        if self._extractor is None and self.layers is None:
            self.layers = default_multiscale_layers(self.backbone)
        return super().extractor

    # ----------------------------------------------------------------- fit
    def _validate_params(self) -> None:
        super()._validate_params()
        for name in ("k", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DefectscopeError(f"{name} must be a positive integer, got {value!r}")

    def _fit(self, batches: Iterator[torch.Tensor]) -> None:
        globals_: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []
        for batch in batches:
            g, m = self._embed(batch)
            if maps and m.shape[1:] != maps[0].shape[1:]:
                raise DefectscopeError(
                    f"training images give {tuple(m.shape[1:3])} feature maps but earlier ones gave "
                    f"{tuple(maps[0].shape[1:3])}: resize all images to {self.image_size}x{self.image_size}"
                )
            globals_.append(g)
            maps.append(m.to(STORE_DTYPE))
        n = sum(g.shape[0] for g in globals_)
        if n < 2:
            raise DefectscopeError(f"SPADE needs at least 2 training images, got {n}")
        self.train_global_ = torch.cat(globals_)
        self.train_maps_ = torch.cat(maps)
        self._global_index = None
        self.n_train_ = n
        for name in ("k", "top_k"):
            if getattr(self, name) > n:
                log.warning("SPADE: %s=%d is more than the %d training images: using %d", name, getattr(self, name), n, n)
        log.info("SPADE: stored %d training images, maps %s", n, tuple(self.train_maps_.shape[1:]))

    def _embed(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global features (B, C_last) and embedding maps (B, h, w, C) as float32."""
        feats = self._features(batch)
        global_ = feats[-1].mean(dim=(2, 3))  # global average pool of the deepest chosen layer
        emb = concat_layers(feats, mode="nearest").permute(0, 2, 3, 1)
        return global_.to(torch.float32).contiguous(), emb.to(torch.float32).contiguous()

    @property
    def global_index(self) -> NearestNeighbors:
        """Exact kNN index over the training global features, one group per training image."""
        if self._global_index is None:
            groups = torch.arange(self.train_global_.shape[0])
            self._global_index = NearestNeighbors(self.train_global_, groups=groups)
        return self._global_index

    # ----------------------------------------------------------------- predict
    def _predict_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        global_, emb = self._embed(batch)
        if emb.shape[1:] != self.train_maps_.shape[1:]:
            raise DefectscopeError(
                f"images give {tuple(emb.shape[1:3])} feature maps but the model was fitted with "
                f"{tuple(self.train_maps_.shape[1:3])}: resize images to {self.image_size}x{self.image_size}"
            )
        k = min(self.k, self.n_train_)
        top_k = min(self.top_k, self.n_train_)
        dist, idx = self.global_index.search(global_, max(k, top_k))
        scores = dist[:, :k].mean(dim=1)  # mean distance to the k nearest training images
        b, h, w, c = emb.shape
        patch_maps = torch.empty(b, h, w, dtype=torch.float32)
        for i in range(b):
            gallery = self.train_maps_[idx[i, :top_k]].reshape(-1, c).to(torch.float32)
            nearest, _ = NearestNeighbors(gallery).search(emb[i].reshape(-1, c), 1)
            patch_maps[i] = nearest.view(h, w)
        return scores, self._finish_maps(patch_maps)

    def _training_scores(self) -> torch.Tensor:
        """Image score of each training image against the k nearest OTHER training images.

        (The pixel level would likewise exclude the image from its top_k gallery; it does not
        enter the image score, so it is not computed.)
        """
        n = self.n_train_
        k = min(self.k, n - 1)
        index = self.global_index
        scores = torch.empty(n, dtype=torch.float32)
        for i in range(n):
            dist, _ = index.search(self.train_global_[i : i + 1], k, exclude_group=i)
            scores[i] = dist.mean()
        return scores

    # ----------------------------------------------------------------- state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "train_global": self.train_global_,
            "train_maps": self.train_maps_,
            "n_train": torch.tensor(self.n_train_, dtype=torch.int64),
        }

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [key for key in _STATE_KEYS if key not in tensors]
        if missing:
            raise ModelFileError(f"the SPADE model state lacks {', '.join(missing)}: re-save the model with fit")
        n = int(tensors["n_train"])
        glob, maps = tensors["train_global"], tensors["train_maps"]
        if glob.ndim != 2 or maps.ndim != 4 or glob.shape[0] != n or maps.shape[0] != n or n < 2:
            raise ModelFileError("the SPADE model state has inconsistent tensor shapes: re-save the model with fit")
        self.train_global_ = glob.to(torch.float32)
        self.train_maps_ = maps.to(STORE_DTYPE)
        self._global_index = None
        self.n_train_ = n
