"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features from mid-level layers, a greedy k-center coreset of all
training patches as the memory bank, nearest-neighbour patch distances as the anomaly
map and the re-weighted maximum patch distance as the image score (paper eq. 7).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..components.coreset import greedy_coreset
from ..components.embedding import concat_layers
from ..components.knn import NearestNeighbors
from ..errors import DefectscopeError
from .base import Detector

log = logging.getLogger(__name__)


class PatchCore(Detector):
    """PatchCore anomaly detector.

    Parameters (besides the base ones):
        coreset_ratio: fraction of all training patches kept in the memory bank (paper: 1-10 %).
        coreset_eps: Johnson-Lindenstrauss epsilon that sets the random-projection dimension used
            while selecting the coreset; ignored when ``projection_dim`` is given.
        projection_dim: explicit random-projection dimension for the coreset selection.
        num_neighbors: b, the memory-bank neighbourhood used to re-weight the image score (eq. 7).
        patch_size: side of the local neighbourhood aggregated into each patch feature (paper: p = 3).
        target_dim: optional final feature dimension (adaptive average pooling over channels, as in
            the reference implementation); None keeps all concatenated channels.
        knn_backend: "faiss" (exact flat L2) or "torch" (exact, chunked brute force).
    """

    method = "patchcore"

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: list[str] | None = None,
        image_size: int = 256,
        weights: str | None = None,
        seed: int = 0,
        blur_sigma: float = 4.0,
        coreset_ratio: float = 0.1,
        coreset_eps: float | None = 0.9,
        projection_dim: int | None = None,
        num_neighbors: int = 9,
        patch_size: int = 3,
        target_dim: int | None = None,
        knn_backend: str = "faiss",
    ) -> None:
        super().__init__(backbone, layers, image_size, weights, seed, blur_sigma)
        self.coreset_ratio = coreset_ratio
        self.coreset_eps = coreset_eps
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.patch_size = patch_size
        self.target_dim = target_dim
        self.knn_backend = knn_backend

    def _validate_params(self) -> None:
        super()._validate_params()
        if not 0 < self.coreset_ratio <= 1:
            raise DefectscopeError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_eps is not None and not 0 < self.coreset_eps < 1.5:
            raise DefectscopeError(f"coreset_eps must be in (0, 1.5), got {self.coreset_eps}")
        if self.num_neighbors < 1:
            raise DefectscopeError(f"num_neighbors must be >= 1, got {self.num_neighbors}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise DefectscopeError(f"patch_size must be a positive odd integer, got {self.patch_size}")
        if self.target_dim is not None and self.target_dim < 1:
            raise DefectscopeError(f"target_dim must be a positive integer, got {self.target_dim}")

    # ------------------------------------------------------------------ features
    def _patch_features(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, h, w, D) locally aware patch features.

        Each layer's map is averaged over a p x p neighbourhood (paper eq. 2-3, stride 1),
        deeper layers are upsampled to the finest layer's grid and everything is concatenated.
        """
        maps = self._features(batch)
        pad = self.patch_size // 2
        maps = [F.avg_pool2d(m, self.patch_size, stride=1, padding=pad, count_include_pad=False) for m in maps]
        feats = concat_layers(maps, mode="bilinear")  # (B, D, h, w)
        feats = feats.permute(0, 2, 3, 1)
        if self.target_dim is not None and self.target_dim < feats.shape[-1]:
            b, h, w, d = feats.shape
            feats = F.adaptive_avg_pool1d(feats.reshape(-1, 1, d), self.target_dim).reshape(b, h, w, self.target_dim)
        return feats.contiguous()

    # ------------------------------------------------------------------ fit
    def _fit(self, batches: Iterator[torch.Tensor]) -> None:
        chunks = [self._patch_features(batch) for batch in batches]
        if not chunks:
            raise DefectscopeError("PatchCore.fit got no images")
        feats = torch.cat(chunks)  # (N, h, w, D)
        del chunks
        n, h, w, d = feats.shape
        flat = feats.reshape(-1, d)
        n_select = max(1, math.ceil(self.coreset_ratio * flat.shape[0]))
        log.info("PatchCore: selecting %d of %d patches (%d images, %dx%d grid, %d dims)", n_select, flat.shape[0], n, h, w, d)
        idx = greedy_coreset(flat, n_select, eps=self.coreset_eps, projection_dim=self.projection_dim, seed=self.seed)
        self.memory_bank_ = flat[idx].contiguous()
        self.bank_image_ = (idx // (h * w)).to(torch.int64)
        self.grid_ = (h, w)
        self.n_train_ = n
        self._index = None
        self.training_scores_ = self._leave_one_out_scores(feats)

    def _leave_one_out_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Score each training image against the memory bank without its own patches (N,)."""
        scores = torch.empty(feats.shape[0], dtype=torch.float32)
        for i in range(feats.shape[0]):
            patches = feats[i].reshape(-1, feats.shape[-1])
            dist, nn_idx = self.index.search(patches, 1, exclude_group=i)
            scores[i] = self._image_scores(patches.unsqueeze(0), dist[:, 0].unsqueeze(0), nn_idx[:, 0].unsqueeze(0), exclude_group=i)[0]
        return scores

    # ------------------------------------------------------------------ predict
    @property
    def index(self) -> NearestNeighbors:
        """Nearest-neighbour index over the memory bank (built lazily, not saved)."""
        if getattr(self, "_index", None) is None:
            self._index = NearestNeighbors(self.memory_bank_, backend=self.knn_backend, groups=self.bank_image_)
        return self._index

    def _predict_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._patch_features(batch)
        b, h, w, d = feats.shape
        patches = feats.reshape(b, h * w, d)
        dist, nn_idx = self.index.search(patches.reshape(-1, d), 1)
        dist = dist[:, 0].reshape(b, h * w)
        nn_idx = nn_idx[:, 0].reshape(b, h * w)
        scores = self._image_scores(patches, dist, nn_idx)
        maps = self._finish_maps(dist.reshape(b, h, w))
        return scores, maps

    def _image_scores(
        self, patches: torch.Tensor, dist: torch.Tensor, nn_idx: torch.Tensor, exclude_group: int | None = None
    ) -> torch.Tensor:
        """Re-weighted image scores (paper eq. 7).

        patches (B, P, D) test patch features, dist (B, P) their nearest-neighbour distances,
        nn_idx (B, P) the index of that neighbour m* in the memory bank. For the most anomalous
        patch m_test* (distance s*), with N_b(m*) the b nearest bank entries of m*:
            s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*
        The ratio is a softmax over those distances, computed stably in float64.
        """
        best = dist.argmax(dim=1)  # (B,)
        rows = torch.arange(dist.shape[0])
        s_star = dist[rows, best]
        m_test = patches[rows, best]  # (B, D)
        m_star = self.memory_bank_[nn_idx[rows, best]]  # (B, D)
        b = min(self.num_neighbors, self.memory_bank_.shape[0])
        if b < 2:
            return s_star
        _, neigh = self.index.search(m_star, b, exclude_group=exclude_group)  # (B, b), neigh[:, 0] is m* itself
        neighbours = self.memory_bank_[neigh]  # (B, b, D)
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

    # ------------------------------------------------------------------ state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "memory_bank": self.memory_bank_,
            "bank_image": self.bank_image_,
            "grid": torch.tensor(self.grid_, dtype=torch.int64),
            "n_train": torch.tensor(self.n_train_, dtype=torch.int64),
            "training_scores": self.training_scores_,
        }

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.memory_bank_ = tensors["memory_bank"].float().contiguous()
        self.bank_image_ = tensors["bank_image"].long()
        self.grid_ = tuple(int(v) for v in tensors["grid"])
        self.training_scores_ = tensors["training_scores"].float()
        self.n_train_ = int(tensors["n_train"])
        self._index = None
