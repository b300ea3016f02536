"""PaDiM: a Gaussian per patch position over multi-scale CNN embeddings (Defard et al., ICPR 2020 w.).

Fit: each position (i, j) of the embedding map gets a mean mu_ij and a covariance
Sigma_ij = cov_ij + epsilon I (eq. 1) of a random subset of d_reduced channels.
Predict: the Mahalanobis distance of each test embedding to its position's Gaussian (eq. 2),
upsampled and blurred to the input size; the image score is the map's maximum (inside the region of
interest, when the model has one: the map is 0 outside it).

Fit streams the reduced training embeddings (N x P x d x 4 bytes, e.g. 209 x 64*64 x 176 x 4 =
602 MB) to an unlinked temporary file as they are extracted (a
:class:`~defectscope.components.feature_store.FeatureStore`), then reads back one chunk of positions
of every image at a time and fits those positions' Gaussians and the exact leave-one-image-out
training distances in float32 (see :func:`~defectscope.components.gaussian.fit_gaussians`). So fit
holds the model plus one chunk, whatever the number of training images; the file needs the
N x P x d x 4 bytes on disk (in ``TMPDIR``).
The model keeps the means (P x d) and inverse covariances (P x d x d) as float32
(64*64 x 176 x 176 x 4 = 508 MB for tf_efficientnet_lite0 at 256 px).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator

import torch

from ..common.progress import progress_bar
from ..components.embedding import concat_layers, default_multiscale_layers
from ..components.feature_store import FeatureStore
from ..components.gaussian import fit_gaussians, fit_scratch_bytes, mahalanobis
from ..data.geometry import ImageSize, size_text
from ..errors import DefectscopeError, ModelFileError
from ..features.normalization import DEFAULT_NORMALIZATION
from .base import DEFAULT_BACKBONE, Detector

log = logging.getLogger(__name__)

__all__ = ["PaDiM", "default_d_reduced", "required_bytes"]

_STATE_KEYS = ("mean", "inv_cov", "channel_index", "feature_size", "training_scores", "n_train")
_WORK_BYTES = 256 * 2**20  # scratch memory per chunk of positions


def default_d_reduced(backbone: str, total_channels: int) -> int:
    """Channels kept by the random reduction: the paper's 100 (resnet18) and 550 (wide_resnet50_2), else all.

    The paper (sec. 3.1/4.3) reduces the 448 (R18) or 1792 (WR50) channels only to cut cost and
    reports the random subset close to, not better than, keeping every dimension. The
    EfficientNet-Lite layers give only 176 (lite0) channels, fewer than WR50's 550, so nothing
    is dropped: on MVTec AD bottle, 100 random channels gave image/pixel AUROC 0.996/0.981
    (seeds 0, 1, 2) and all 176 gave 0.998/0.984.
    """
    arch = architecture(backbone)
    if arch == "resnet18":
        return min(100, total_channels)
    if arch == "wide_resnet50_2":
        return min(550, total_channels)
    return total_channels


#: largest epsilon accepted: features vary on the order of 1-100, and far larger values flatten every distance
MAX_EPSILON = 1e6


def default_epsilon(backbone: str) -> float:
    """The covariance regulariser Sigma = cov + epsilon I when none is given: the paper's 0.01, except
    for EfficientNet-Lite backbones (an ensemble: when every member is one), 1.0.

    Decided on the development suite with tf_efficientnet_lite0 (README, "Accuracy beyond bottle"):
    image AUROC mean over five sets 0.8418 (0.01), 0.8613 (0.1), 0.8739 (0.3), 0.8851 (1.0), 0.8883
    (3.0); the four sets of parts in place peak at 1.0 and pill falls beyond it. The paper's value
    stays for every other backbone, where nothing was measured.
    """
    members = [architecture(member) for member in backbone.split("+")]
    return 1.0 if all("efficientnet_lite" in name for name in members) else 0.01


def architecture(backbone: str) -> str:
    """The architecture part of a timm name: ``hf-hub:timm/wide_resnet50_2.tv_in1k`` -> ``wide_resnet50_2``
    (the pretrained tag after the dot and any hub prefix dropped, lower case)."""
    name = backbone.lower().rsplit("/", 1)[-1].split(":")[-1]
    return name.split(".", 1)[0]


def _chunk_positions(positions: int, d: int, n_images: int) -> int:
    """Positions per chunk so that the float32 scratch of fit_gaussians stays within _WORK_BYTES."""
    return max(1, min(positions, _WORK_BYTES // fit_scratch_bytes(n_images, 1, d)))


def required_bytes(positions: int, d: int, n_images: int) -> int:
    """Memory a fit needs: the float32 model (means, inverses), the leave-one-out distances and the chunk scratch.

    The training embeddings are not counted: they wait on disk (see the module docstring).
    """
    scratch = fit_scratch_bytes(n_images, _chunk_positions(positions, d, n_images), d)
    return 4 * positions * d * (d + 1) + 4 * n_images * positions + scratch


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class PaDiM(Detector):
    """Patch Distribution Modeling. ``d_reduced`` None picks the backbone's default (:func:`default_d_reduced`)."""

    method = "padim"
    #: leave-one-out covariances need at least two other images
    min_train_images = 3
    #: fit refuses configurations whose model and working memory would need more than this
    max_memory_bytes: int = 8 * 2**30

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: list[str] | None = None,
        image_size: ImageSize = 256,
        resize: str = "stretch",
        weights: str | None = None,
        seed: int = 0,
        blur_sigma: float = 4.0,
        normalization: str = DEFAULT_NORMALIZATION,
        d_reduced: int | None = None,
        epsilon: float | None = None,
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
        self.d_reduced = d_reduced
        self.epsilon = epsilon

    # ----------------------------------------------------------------- backbone
    def _default_layers(self) -> list[str] | None:
        """Three mid-level layers (paper: layer1-3 of a ResNet; blocks.1,2,4 of EfficientNet-Lite)."""
        return default_multiscale_layers(self.backbone)

    # ----------------------------------------------------------------- fit
    def _validate_params(self) -> None:
        super()._validate_params()
        if self.d_reduced is not None and (
            not isinstance(self.d_reduced, int) or isinstance(self.d_reduced, bool) or self.d_reduced < 1
        ):
            raise DefectscopeError(f"d_reduced must be a positive integer or None, got {self.d_reduced!r}")
        if self.epsilon is not None and (
            isinstance(self.epsilon, bool)
            or not isinstance(self.epsilon, numbers.Real)
            or not 0 < self.epsilon <= MAX_EPSILON
        ):
            raise DefectscopeError(
                f"epsilon must be a number in (0, {MAX_EPSILON:g}] or None (the backbone's default), "
                f"got {self.epsilon!r}: beyond that the regulariser swamps every feature and the "
                "distances underflow to 0"
            )

    @property
    def epsilon_used(self) -> float:
        """``epsilon``, or :func:`default_epsilon` of the backbone when it is None."""
        return float(self.epsilon) if self.epsilon is not None else default_epsilon(self.backbone)

    def _fit(self, batches: Iterator[torch.Tensor]) -> None:
        extractor = self.extractor
        total = int(sum(extractor.channels))
        d = self.d_reduced if self.d_reduced is not None else default_d_reduced(self.backbone, total)
        if d > total:
            raise DefectscopeError(
                f"d_reduced={d} is more than the {total} channels of layers {', '.join(extractor.layers)}: "
                f"use d_reduced <= {total}"
            )
        generator = torch.Generator().manual_seed(int(self.seed))
        # random dimensionality reduction (paper sec. 3.1): a seeded random subset of channels
        channel_index = torch.randperm(total, generator=generator)[:d].sort().values

        # everything is built in locals and assigned at the end: a failed fit leaves the old state
        with FeatureStore(d) as store:  # image-major rows: image i's P positions, then image i + 1's
            size = (0, 0)
            n = 0
            for batch in batches:
                emb, batch_size = self._embed(batch, channel_index)  # (B, P, d)
                if n == 0:
                    size = batch_size
                elif batch_size != size:
                    raise DefectscopeError(
                        f"training images give {batch_size} feature maps but earlier ones gave {size}: "
                        f"resize all images to {size_text(self.image_size)}"
                    )
                n += emb.shape[0]
                self._check_memory(size, d, n_images=n)  # before storing anything more of this batch
                store.append(emb.reshape(-1, d))
                del emb
            if n < self.min_train_images:
                raise DefectscopeError(f"PaDiM needs at least {self.min_train_images} training images, got {n}")

            positions = size[0] * size[1]
            log.info("PaDiM: fitting %d Gaussians of dimension %d on %d images", positions, d, n)
            mean = torch.empty(positions, d, dtype=torch.float32)
            inv_cov = torch.empty(positions, d, d, dtype=torch.float32)
            loo = torch.empty(n, positions, dtype=torch.float32)
            chunk = _chunk_positions(positions, d, n)
            with progress_bar(positions, "gaussians", self._show_progress, unit="position") as bar:
                for lo in range(0, positions, chunk):
                    hi = min(lo + chunk, positions)
                    x = store.read_runs([i * positions + lo for i in range(n)], hi - lo)  # (N, p, d)
                    # eq. 1 (mean, Sigma^-1) and exact leave-one-image-out distances (eq. 2 without image i)
                    mean[lo:hi], inv_cov[lo:hi], loo[:, lo:hi] = fit_gaussians(x, self.epsilon_used)
                    del x
                    bar.update(hi - lo)
        training_scores = torch.cat(  # image score = max of the finished map inside the region, as in predict
            [self._roi_maps(self._finish_maps(part.view(-1, *size))).amax(dim=(1, 2)) for part in loo.split(32)]
        )
        self.channel_index_ = channel_index
        self.feature_size_ = size
        self.mean_ = mean
        self.inv_cov_ = inv_cov
        self.training_scores_ = training_scores
        self.n_train_ = n
        self.fit_details_ = {"d_reduced": int(d), "epsilon": self.epsilon_used}  # the values used, defaults resolved

    def _check_memory(self, size: tuple[int, int], d: int, n_images: int) -> None:
        """Fail before storing more when the model, the leave-one-out distances and the scratch would exceed the budget."""
        h, w = size
        positions = h * w
        needed = required_bytes(positions, d, n_images)
        if needed > self.max_memory_bytes:
            raise DefectscopeError(
                f"PaDiM would need {needed} bytes ({_fmt_bytes(needed)}) for {h}x{w} positions, d_reduced={d} and "
                f"{n_images} images, over the {_fmt_bytes(self.max_memory_bytes)} limit: "
                "use a smaller d_reduced, image_size or fewer training images"
            )

    def _embed(self, batch: torch.Tensor, channel_index: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Reduced embeddings (B, P, d) float32 and the feature map size (h, w), P = h * w."""
        emb = concat_layers(self._features(batch), mode="nearest")  # (B, C, h, w)
        emb = emb.index_select(1, channel_index)
        b, d, h, w = emb.shape
        return emb.permute(0, 2, 3, 1).reshape(b, h * w, d).to(torch.float32).contiguous(), (h, w)

    # ----------------------------------------------------------------- predict
    def _predict_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, size = self._embed(batch, self.channel_index_)
        if size != self.feature_size_:
            raise DefectscopeError(
                f"images give {size} feature maps but the model was fitted with {self.feature_size_}: "
                f"resize images to {size_text(self.image_size)}"
            )
        dist = mahalanobis(emb, self.mean_, self.inv_cov_)  # eq. 2, (B, P)
        maps = self._roi_maps(self._finish_maps(dist.view(-1, *size)))  # 0 outside a region of interest
        return maps.amax(dim=(1, 2)), maps

    def _training_scores(self) -> torch.Tensor:
        return self.training_scores_

    def _training_map_maxima(self) -> torch.Tensor:
        return self.training_scores_  # PaDiM's image score is the maximum of its (leave-one-out) map

    # ----------------------------------------------------------------- state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "mean": self.mean_,
            "inv_cov": self.inv_cov_,
            "channel_index": self.channel_index_,
            "feature_size": torch.tensor(self.feature_size_, dtype=torch.int64),
            "training_scores": self.training_scores_,
            "n_train": torch.tensor(self.n_train_, dtype=torch.int64),
        }

    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [k for k in _STATE_KEYS if k not in tensors]
        if missing:
            raise ModelFileError(f"the PaDiM model state lacks {', '.join(missing)}: re-save the model with fit")
        mean, inv_cov = tensors["mean"], tensors["inv_cov"]
        h, w = (int(v) for v in tensors["feature_size"].tolist())
        p, d = mean.shape
        if inv_cov.shape != (p, d, d) or p != h * w or tensors["channel_index"].shape != (d,):
            raise ModelFileError("the PaDiM model state has inconsistent tensor shapes: re-save the model with fit")
        self.mean_ = mean.to(torch.float32)
        self.inv_cov_ = inv_cov.to(torch.float32)
        self.channel_index_ = tensors["channel_index"].to(torch.int64)
        self.feature_size_ = (h, w)
        self.training_scores_ = tensors["training_scores"].to(torch.float32)
        self.n_train_ = int(tensors["n_train"])
