"""The whole scoring path of a fitted detector as one torch module, ready for ``torch.onnx.export``.

Input: (N, 3, S, S) float32 images in [0, 1], already resized to the model's S x S (the resize
stays outside the graph: see :mod:`defectscope.export.preprocess`). Outputs: ``scores`` (N,) and
``maps`` (N, S, S), the same numbers :meth:`Detector.predict` gives for the same pixels.

Inside the graph, in order: the normalisation constants, the backbone (cut after the deepest layer
used), the method's features, the distances, the upsampling and Gaussian blur of the map (a fixed
separable convolution over reflect-padded borders), the image score. Everything the detector
learned is a constant of the graph.

PatchCore (:class:`PatchCoreGraph`): the nearest memory-bank entry of every patch by brute force,
||q||^2 - 2 q.m + ||m||^2 as one matrix product (what faiss's flat index computes for batches of
queries), so a bank of M entries costs P x M x D multiply-adds per image. The re-weighting of the
image score (paper eq. 7) needs the b nearest bank entries of the chosen entry m*: those depend on
the bank only, so they are looked up once at export time (``neighbours`` (M, b), found with the
detector's own index) and gathered in the graph.

PaDiM (:class:`PaDiMGraph`): the per-position Mahalanobis distance as a batched matrix product with
the (P, d, d) inverse covariances.

A region of interest is part of the graph: its (S, S) mask (maps set to 0 outside it, the PaDiM score
their maximum) and, for PatchCore, the (P,) patches that count for the image score
(:meth:`~defectscope.detectors.patchcore.PatchCore.roi_patches`) are constants, so an exported model
judges exactly as its model file. A model without one gives the graph it always had.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..components.embedding import local_average, weigh_layers
from ..detectors.base import Detector, gaussian_blur
from ..detectors.padim import PaDiM
from ..detectors.patchcore import PatchCore, top_k_mean
from ..errors import DefectscopeError


class _Graph(nn.Module):
    """Normalisation + backbone + map finishing shared by the methods."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        self.extractor = detector.extractor
        mean, std = detector.input_stats
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.size = detector.image_size
        self.sigma = float(detector.blur_sigma)
        self.has_roi = detector.roi_ is not None
        if self.has_roi:
            assert detector.roi_ is not None
            self.register_buffer("roi", detector.roi_.clone())  # (S, S) bool

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def finish_maps(self, patch_maps: torch.Tensor) -> torch.Tensor:
        """(N, h, w) -> (N, S, S): bilinear upsampling, Gaussian blur (as Detector._finish_maps)."""
        maps = F.interpolate(
            patch_maps.unsqueeze(1), size=(self.size, self.size), mode="bilinear", align_corners=False
        ).squeeze(1)
        return gaussian_blur(maps, self.sigma)

    def roi_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, S, S) maps set to 0 outside the region of interest (as Detector._roi_maps)."""
        return maps.masked_fill(~self.get_buffer("roi"), 0.0) if self.has_roi else maps


class PatchCoreGraph(_Graph):
    """PatchCore's scoring as a graph; see the module docstring."""

    def __init__(self, detector: PatchCore) -> None:
        super().__init__(detector)
        bank = detector.memory_bank_.float()
        self.register_buffer("bank_t", bank.t().contiguous())  # (D, M): one copy of the bank in the graph
        self.register_buffer("bank_sq", bank.pow(2).sum(dim=1))
        self.b = min(detector.num_neighbors, bank.shape[0])
        if self.b >= 2:
            _, neigh = detector.index.search(bank, self.b)  # (M, b): the same search predict makes for m*
            self.register_buffer("neighbours", neigh.to(torch.int64))
        inside = detector.roi_patches(detector.grid_)  # (1, P) without tiles, or None
        if inside is not None:
            self.register_buffer("inside", inside[0].clone())
        self.target_dim = detector.target_dim
        self.patch_size = detector.patch_size
        self.border_padding = detector.border_padding
        self.layer_weighting = detector.layer_weighting
        self.score_patches = detector.score_patches

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised -> (N, h, w, D), as PatchCore._patch_features (adaptive pooling
        over channels written as a matrix product with its fixed averaging matrix)."""
        maps = weigh_layers(
            local_average(self.extractor(x), self.patch_size, self.border_padding), self.layer_weighting
        )
        h, w = maps[0].shape[-2:]
        for m in maps[1:]:
            if m.shape[-1] * m.shape[-2] > h * w:
                h, w = m.shape[-2:]
        maps = [
            m
            if m.shape[-2:] == (h, w)
            else F.interpolate(m, size=(int(h), int(w)), mode="bilinear", align_corners=False)
            for m in maps
        ]
        feats = torch.cat(maps, dim=1).permute(0, 2, 3, 1)
        d = feats.shape[-1]
        if self.target_dim is not None and self.target_dim < d:
            feats = feats @ _adaptive_pool_matrix(int(d), self.target_dim)
        return feats

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.patch_features(self.normalise(images))
        n, h, w, d = feats.shape
        patches = feats.reshape(n, h * w, d)
        sq = (patches * patches).sum(dim=2, keepdim=True)  # (N, P, 1)
        d2 = sq - 2.0 * (patches @ self.bank_t) + self.bank_sq  # (N, P, M)
        min_d2, nn_idx = d2.min(dim=2)  # (N, P)
        dist = min_d2.clamp_min(0.0).sqrt()
        maps = self.roi_maps(self.finish_maps(dist.reshape(n, h, w)))
        ranked = dist.masked_fill(~self.get_buffer("inside"), float("-inf")) if self.has_roi else dist
        if self.score_patches > 1:  # the mean of the k largest patch distances (PatchCore.score_patches)
            return top_k_mean(ranked, self.score_patches), maps
        # image score, eq. 7: the most anomalous patch m_test* (inside the region of interest), its nearest
        # entry m*, and m*'s b neighbours
        best = ranked.argmax(dim=1, keepdim=True)  # (N, 1)
        s_star = dist.gather(1, best).squeeze(1)
        m_test = patches.gather(1, best.unsqueeze(2).expand(n, 1, d))  # (N, 1, D)
        star = nn_idx.gather(1, best)  # (N, 1)
        if self.b < 2:
            return s_star, maps
        m_star = self.bank_t[:, star.squeeze(1)].t().unsqueeze(1)  # (N, 1, D)
        neigh = self.neighbours[star.squeeze(1)]  # (N, b)
        d_neigh = (self.bank_t[:, neigh].permute(1, 2, 0) - m_test).pow(2).sum(dim=2).sqrt()  # (N, b)
        d_star = (m_star - m_test).pow(2).sum(dim=2).sqrt()  # (N, 1)
        d_neigh = d_neigh.masked_fill(neigh == star, float("-inf"))  # m* counts once
        weight = 1.0 - torch.softmax(torch.cat([d_star, d_neigh], dim=1), dim=1)[:, 0]
        return weight * s_star, maps


class PaDiMGraph(_Graph):
    """PaDiM's scoring as a graph; see the module docstring."""

    def __init__(self, detector: PaDiM) -> None:
        super().__init__(detector)
        self.register_buffer("channels", detector.channel_index_.to(torch.int64))
        self.register_buffer("gauss_mean", detector.mean_.float().t().contiguous())  # (d, P)
        self.register_buffer("inv_cov", detector.inv_cov_.float().contiguous())  # (P, d, d)
        self.feature_size = tuple(detector.feature_size_)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.extractor(self.normalise(images))
        h, w = self.feature_size
        maps = [m if m.shape[-2:] == (h, w) else F.interpolate(m, size=(h, w), mode="nearest") for m in maps]
        emb = torch.cat(maps, dim=1).index_select(1, self.channels)  # (N, d, h, w)
        n, d = emb.shape[0], emb.shape[1]
        diff = emb.reshape(n, d, h * w) - self.gauss_mean  # (N, d, P)
        diff = diff.permute(2, 1, 0)  # (P, d, N)
        solved = self.inv_cov @ diff  # (P, d, N), eq. 2
        dist = (diff * solved).sum(dim=1).clamp_min(0.0).sqrt().t()  # (N, P)
        maps = self.roi_maps(self.finish_maps(dist.reshape(n, h, w)))
        return maps.amax(dim=(1, 2)), maps


def _adaptive_pool_matrix(d: int, target: int) -> torch.Tensor:
    """(d, target) matrix A with x @ A == F.adaptive_avg_pool1d(x, target) over the last axis."""
    eye = torch.eye(d, dtype=torch.float32).unsqueeze(1)  # (d, 1, d): pool each basis vector
    return F.adaptive_avg_pool1d(eye, target).squeeze(1)


def scoring_graph(detector: Detector) -> nn.Module:
    """The graph module for a fitted detector; DefectscopeError for a method that does not export."""
    if isinstance(detector, PatchCore):
        return PatchCoreGraph(detector).eval()
    if isinstance(detector, PaDiM):
        return PaDiMGraph(detector).eval()
    raise DefectscopeError(
        f"{detector.method} models cannot be exported: {REFUSED.get(detector.method, '')}".rstrip(": ")
    )


#: why a method is not exported (the README says the same)
REFUSED = {
    "spade": "SPADE's pixel search compares each image with the full feature maps of its nearest training images, "
    "chosen per image; as a graph that means every training image's feature map as a constant (about "
    "600 MB for bottle at 256 px) and a data-dependent gather of several of them per image, which neither "
    "runtime runs faster than torch; use PatchCore or PaDiM for exported models",
}
