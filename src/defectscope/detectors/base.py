"""The one contract every detector follows.

A detector is built from keyword arguments only (stored, not validated), learns in
``fit`` from good images, and scores new images in ``predict``. Higher scores and map
values always mean more anomalous. Learned state lives in ``trailing_underscore_``
attributes and round-trips through :meth:`state_dict` / :meth:`load_state` as tensors.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..data.geometry import ImageSize, check_image_size, check_resize, input_shape
from ..errors import DefectscopeError, NotFittedError
from ..features.backbones import Extractor, build_extractor
from ..features.normalization import DEFAULT_NORMALIZATION, check_normalization, input_stats

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"


@dataclass
class Prediction:
    """Per-image results of :meth:`Detector.predict`.

    scores: (N,) float32 image anomaly scores.
    maps:   (N, H_in, W_in) float32 anomaly maps over the model input (see :attr:`Detector.input_shape`;
            :mod:`defectscope.scoring` turns them into maps over each photo).
    """

    scores: np.ndarray
    maps: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def as_batches(images: torch.Tensor | Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) float tensors from one tensor or an iterable of batches."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise DefectscopeError(f"expected images shaped (N, 3, H, W), got {tuple(images.shape)}")
        yield images
        return
    for batch in images:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            raise DefectscopeError("expected an iterable of (B, 3, H, W) image tensors")
        yield batch


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth (N, H, W) maps with a Gaussian of standard deviation ``sigma`` pixels.

    The kernel is truncated at 4 sigma (as scipy.ndimage does) and borders are reflected.
    """
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)
    out = F.pad(out, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


class Detector(ABC):
    """Base class: parameters in ``__init__``, learning in ``fit``, scoring in ``predict``.

    Subclasses set ``method`` and implement :meth:`_fit`, :meth:`_predict_batch`,
    :meth:`_state_tensors`, :meth:`_load_state_tensors` and :meth:`_training_scores`.

    image_size: the model input, an int S (S x S) or (H_in, W_in), each side in [32, 2048].
    resize: how a photo becomes that input: "stretch" (default), "keep-aspect" or "crop"
        (:mod:`defectscope.data.geometry`). Both are saved in the model file; files written
        before ``resize`` existed load as "stretch", which is what they used.
    """

    method: ClassVar[str]
    #: why :meth:`set_roi` refuses a region of interest for this method (None: the method takes one)
    roi_refusal: ClassVar[str | None] = None
    #: the region of interest: (H_in, W_in) bool over the model input, or None (the whole input is judged)
    roi_: torch.Tensor | None = None
    #: fewest training images the method can learn from (leave-one-out needs at least two)
    min_train_images: ClassVar[int] = 2
    #: how :meth:`training_scores` holds each image out (recorded with the threshold)
    training_scores_kind: ClassVar[str] = "leave-one-image-out"

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
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.image_size = image_size
        self.resize = resize
        self.weights = weights
        self.seed = seed
        self.blur_sigma = blur_sigma
        self.normalization = normalization
        self._extractor: Extractor | None = None
        self._show_progress = False

    # ----------------------------------------------------------------- parameters
    def get_params(self) -> dict[str, Any]:
        """The constructor's keyword arguments (JSON-serialisable)."""
        names = self._param_names()
        return {name: getattr(self, name) for name in names}

    @classmethod
    def _param_names(cls) -> list[str]:
        import inspect

        names: list[str] = []
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in names:
                    names.append(p.name)
        return names

    def _validate_params(self) -> None:
        check_image_size(self.image_size)
        check_resize(self.resize)
        if self.blur_sigma < 0:
            raise DefectscopeError(f"blur_sigma must be >= 0, got {self.blur_sigma}")
        check_normalization(self.normalization)

    # ----------------------------------------------------------------- backbone
    @property
    def extractor(self) -> Extractor:
        """The feature extractor, built on first use from backbone/layers/weights (an ensemble for "a+b")."""
        if self._extractor is None:
            if self.layers is None:
                self.layers = self._default_layers()
            self._extractor = build_extractor(
                self.backbone, self._extractor_layers(), weights=self.weights, normalization=self.normalization
            )
            self.layers = self._layers_used(self._extractor)
        return self._extractor

    def _extractor_layers(self) -> list[str] | None:
        """Layers the extractor must give (None: the backbone's default); see :meth:`_layers_used`."""
        return self.layers

    def _layers_used(self, extractor: Extractor) -> list[str]:
        """The layers recorded as the model's ``layers`` once ``extractor`` is built."""
        return list(extractor.layers)

    def set_extractor(self, extractor: Extractor) -> None:
        """Use an already built extractor (shares one backbone between detectors)."""
        self._extractor = extractor
        self.layers = list(extractor.layers)

    def _default_layers(self) -> list[str] | None:
        """Layers used when none are given; None lets the backbone choose (its mid-level pair)."""
        return None

    @property
    def input_shape(self) -> tuple[int, int]:
        """(H_in, W_in) of the model input: ``image_size`` S gives (S, S)."""
        return input_shape(self.image_size)

    @property
    def input_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per RGB channel that images are normalised with (see ``normalization``)."""
        return input_stats(self.normalization, self.extractor.mean, self.extractor.std)

    # ----------------------------------------------------------------- contract
    @property
    def is_fitted(self) -> bool:
        return getattr(self, "n_train_", None) is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet: call fit() with good images, or load a model file"
            )

    def fit(self, images: torch.Tensor | Iterable[torch.Tensor], progress: bool = False) -> Detector:
        """Learn from good images: one (N, 3, H, W) tensor or an iterable of batches.

        ``progress`` draws bars (with ETAs) on stderr for the steps after feature extraction
        that take long on large training sets (PatchCore's coreset and threshold scores).
        """
        self._validate_params()
        self._show_progress = progress
        torch.manual_seed(self.seed)
        with torch.inference_mode():
            self._fit(as_batches(images))
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__}._fit did not set n_train_")
        return self

    def predict(self, images: torch.Tensor | Iterable[torch.Tensor]) -> Prediction:
        """Score images: returns scores (N,) and anomaly maps (N, H_in, W_in) over the model input."""
        self._check_fitted()
        scores: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        with torch.inference_mode():
            for batch in as_batches(images):
                s, m = self._predict_batch(batch)
                scores.append(s.float().numpy())
                maps.append(m.float().numpy())
        if not scores:
            return Prediction(np.zeros(0, np.float32), np.zeros((0, *self.input_shape), np.float32))
        return Prediction(np.concatenate(scores), np.concatenate(maps))

    def training_scores(self) -> np.ndarray:
        """Held-out scores of training images (T,), T <= N_train, for the threshold.

        Each scored training image is scored as if it had not been part of the training set
        (``training_scores_kind`` says how), so these scores behave like those of unseen good images.
        """
        self._check_fitted()
        with torch.inference_mode():
            return self._training_scores().float().numpy()

    def training_map_maxima(self) -> np.ndarray:
        """Largest anomaly-map value of held-out training images (T',), for the pixel threshold.

        Maps, unlike image scores, are on the scale overlays are drawn on; each value is taken
        from a map computed as if the image had not been in the training set.
        """
        self._check_fitted()
        with torch.inference_mode():
            return self._training_map_maxima().float().numpy()

    def _training_map_maxima(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not give held-out map maxima")

    def training_maps(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Held-out anomaly maps (B, H_in, W_in) float32 of training images ``start:stop`` of
        :meth:`training_scores` (same order; :meth:`training_score_images` names their images), each
        computed as if the image had not been in the training set: what a rule judged on the map
        (:mod:`defectscope.judging`) sets its threshold from.

        Raises NotImplementedError for a method without held-out maps, and for a loaded model
        (they exist only in the process that ran the fit).
        """
        self._check_fitted()
        n = len(self._training_scores())
        stop = n if stop is None else min(stop, n)
        with torch.inference_mode():
            return self._training_maps(start, stop).float().numpy()

    def _training_maps(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError(f"{self.method} gives no held-out anomaly maps")

    def training_score_images(self) -> np.ndarray:
        """(T,) position, in fit order, of the training image each of :meth:`training_scores` belongs to."""
        self._check_fitted()
        return np.arange(len(self._training_scores()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Learned state as named CPU tensors (what the model file stores)."""
        self._check_fitted()
        return {k: v.detach().cpu().contiguous() for k, v in self._state_tensors().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> Detector:
        """Restore learned state written by :meth:`state_dict`."""
        self._load_state_tensors(tensors)
        return self

    # ----------------------------------------------------------------- region of interest
    def set_roi(self, mask: np.ndarray | torch.Tensor | None) -> Detector:
        """Judge only the region ``mask`` (H_in, W_in) of the model input (bool, or 0/1), or the whole
        input (None). See :mod:`defectscope.components.roi` for where a region comes from.

        What lies outside the region is left out of the image score, out of the held-out training
        scores that set the threshold and out of the pixel threshold; anomaly maps keep their shape
        and are 0 outside. Set it before :meth:`fit` so that the threshold is measured as predict
        scores; the memory bank or Gaussians do not depend on it. Raises DefectscopeError for a method
        that cannot restrict its image score to a region (SPADE), a mask of another shape than the
        model input, or an empty one.
        """
        if mask is None:
            self.roi_ = None
            return self
        if self.roi_refusal is not None:
            raise DefectscopeError(f"--roi: {self.roi_refusal}")
        roi = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        if tuple(roi.shape) != tuple(self.input_shape):
            raise DefectscopeError(
                f"a region of interest over the model input must be {self.input_shape[0]}x{self.input_shape[1]} "
                f"(H_in, W_in), got {tuple(roi.shape)}"
            )
        roi = roi != 0
        if not bool(roi.any()):
            raise DefectscopeError("the region of interest is empty: it would judge nothing")
        self.roi_ = roi.contiguous()
        return self

    def _roi_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, H_in, W_in) maps with every pixel outside the region of interest set to 0 (unchanged without one)."""
        if self.roi_ is None:
            return maps
        return maps.masked_fill(~self.roi_, 0.0)

    def roi_mask(self) -> np.ndarray | None:
        """The region of interest as an (H_in, W_in) bool numpy array, or None."""
        return None if self.roi_ is None else self.roi_.numpy().copy()

    # ----------------------------------------------------------------- helpers
    def _features(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Backbone feature maps of the chosen layers, each (B, C_l, H_l, W_l)."""
        return self.extractor(batch)

    def _finish_maps(self, patch_maps: torch.Tensor) -> torch.Tensor:
        """(B, h, w) patch-level scores -> (B, H_in, W_in) map: bilinear upsampling, Gaussian blur."""
        maps = F.interpolate(
            patch_maps.unsqueeze(1), size=self.input_shape, mode="bilinear", align_corners=False
        ).squeeze(1)
        return gaussian_blur(maps, self.blur_sigma)

    # ----------------------------------------------------------------- to implement
    @abstractmethod
    def _fit(self, batches: Iterator[torch.Tensor]) -> None:
        """Learn from batches of good images; must set ``n_train_``."""

    @abstractmethod
    def _predict_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scores (B,), maps (B, H_in, W_in)) for one batch."""

    @abstractmethod
    def _training_scores(self) -> torch.Tensor:
        """Leave-one-image-out image scores of the training images (N_train,)."""

    @abstractmethod
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors to save."""

    @abstractmethod
    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore learned tensors; must set ``n_train_``."""
