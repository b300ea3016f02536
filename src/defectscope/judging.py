"""How an image is judged: by the detector's image score, or by the regions of its anomaly map.

A model is judged by one rule, stored in its metadata as ``judge`` (a model file without it, and
every file written before the rule existed, is judged by ``max``, bit for bit as before):

* ``max``: the detector's own image score (PatchCore: the maximum patch distance, re-weighted by
  its memory-bank neighbourhood, Roth et al. 2022 eq. 7). Defective when score >= threshold.
* ``region``: the blob analysis of machine-vision tools: defective when an 8-connected region of
  the anomaly map at or above the threshold covers at least ``min_region`` (photo pixels, or mm^2
  with ``pixel_size`` in mm per pixel). The image's score is the highest map level at which such
  a region exists (:func:`defectscope.components.regions.region_level`), so "score >= threshold"
  is exactly that rule, and the threshold is set like every other: the quantile of held-out good
  training images' scores. A strong spot smaller than ``min_region`` does not reject a part.
* ``integrated``: the score is the largest integrated anomaly of one region, the sum over the
  region of (map - level) times each map pixel's area, with ``level`` a quantile
  (``level_quantile``) of the held-out good training maps' maxima; a faint wide region and a
  strong small one can weigh alike.

Areas are measured over the photo: a map pixel covers (H x W) / (h x w) photo pixels for a map of
(h, w) over a photo of (H, W) (its placement's photo frame, :mod:`defectscope.data.geometry`), times
``pixel_size`` squared for mm^2. Pure numpy/scipy: an exported model's runtime judges the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .components.regions import label_regions, region_level, region_stats
from .errors import DefectscopeError

#: the rules, the default first (``defectscope fit --judge``)
JUDGE_RULES: tuple[str, ...] = ("max", "region", "integrated")
#: ``integrated``: the map level regions are taken above, as a quantile of held-out good map maxima
DEFAULT_LEVEL_QUANTILE = 0.9


def _positive(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DefectscopeError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise DefectscopeError(f"{name} must be a positive finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class JudgeRule:
    """A rule judged on the anomaly map (``region`` or ``integrated``; ``max`` is no rule: None).

    rule: "region" or "integrated". min_region: the smallest region that rejects a part ("region"),
    in photo pixels or, with ``pixel_size`` (mm per photo pixel), in mm^2. level: "integrated"'s map
    level, set at fit time from ``level_quantile``; None until then.
    """

    rule: str
    min_region: float = 1.0
    pixel_size: float | None = None
    level_quantile: float | None = None
    level: float | None = None

    # ------------------------------------------------------------------ making one
    @classmethod
    def make(
        cls,
        rule: str = "max",
        *,
        min_region_pixels: float | None = None,
        min_region_area: float | None = None,
        pixel_size: float | None = None,
        level_quantile: float | None = None,
    ) -> JudgeRule | None:
        """The rule the options name (None for "max"); DefectscopeError naming the option otherwise.

        region needs min_region_pixels (photo pixels), or min_region_area (mm^2) with pixel_size (mm per
        photo pixel). integrated takes pixel_size (areas in mm^2) and level_quantile (default
        :data:`DEFAULT_LEVEL_QUANTILE`).
        """
        if rule not in JUDGE_RULES:
            raise DefectscopeError(f"unknown judge rule {rule!r}: use one of {', '.join(JUDGE_RULES)}")
        given = {
            "min_region_pixels": min_region_pixels,
            "min_region_area": min_region_area,
            "pixel_size": pixel_size,
            "level_quantile": level_quantile,
        }
        if rule == "max":
            extra = [name for name, value in given.items() if value is not None]
            if extra:
                raise DefectscopeError(
                    f"{extra[0]} is for judging by region: give judge='region' (or 'integrated' for pixel_size and "
                    "level_quantile), or leave it out"
                )
            return None
        size = None if pixel_size is None else _positive(pixel_size, "pixel_size (mm per pixel)")
        if rule == "integrated":
            if min_region_pixels is not None or min_region_area is not None:
                raise DefectscopeError(
                    "judge='integrated' weighs every region by its anomaly and takes no minimum region; "
                    "give judge='region' for min_region_pixels / min_region_area"
                )
            q = DEFAULT_LEVEL_QUANTILE if level_quantile is None else float(level_quantile)
            if not 0 < q < 1:
                raise DefectscopeError(f"level_quantile must be in (0, 1), got {level_quantile!r}")
            return cls("integrated", pixel_size=size, level_quantile=q)
        if level_quantile is not None:
            raise DefectscopeError("level_quantile is for judge='integrated'; judge='region' sets its level itself")
        if (min_region_pixels is None) == (min_region_area is None):
            raise DefectscopeError(
                "judge='region' needs the smallest region that rejects a part: min_region_pixels (photo pixels) "
                "or min_region_area (mm^2, with pixel_size), one of them"
            )
        if min_region_area is not None:
            if size is None:
                raise DefectscopeError(
                    "min_region_area is in mm^2: give pixel_size, the photo's mm per pixel (or use min_region_pixels)"
                )
            return cls("region", min_region=_positive(min_region_area, "min_region_area (mm^2)"), pixel_size=size)
        if size is not None:
            raise DefectscopeError("pixel_size goes with min_region_area (mm^2); min_region_pixels counts pixels")
        return cls("region", min_region=_positive(min_region_pixels, "min_region_pixels"))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> JudgeRule | None:
        """The rule a model's metadata names (None: judged by max, as every file before rules existed)."""
        spec = meta.get("judge")
        if spec is None or spec.get("rule") == "max":
            return None
        try:
            rule = cls(
                rule=str(spec["rule"]),
                min_region=float(spec.get("min_region", 1.0)),
                pixel_size=None if spec.get("pixel_size") is None else float(spec["pixel_size"]),
                level_quantile=None if spec.get("level_quantile") is None else float(spec["level_quantile"]),
                level=None if spec.get("level") is None else float(spec["level"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DefectscopeError(
                f"the model's judge rule {spec!r} is not readable ({exc}); fit the model again"
            ) from None
        if rule.rule not in JUDGE_RULES or (rule.rule == "integrated" and rule.level is None):
            raise DefectscopeError(
                f"the model's judge rule {spec!r} is not one this version knows; upgrade defectscope"
            )
        return rule

    def to_meta(self) -> dict[str, Any]:
        """The JSON-ready ``judge`` entry of the model's metadata."""
        out: dict[str, Any] = {"rule": self.rule, "unit": self.unit, "pixel_size": self.pixel_size}
        if self.rule == "region":
            out["min_region"] = self.min_region
        else:
            out |= {"level_quantile": self.level_quantile, "level": self.level}
        return out

    def with_level(self, level: float) -> JudgeRule:
        """This rule with its map level set (``integrated``, at fit time)."""
        return JudgeRule(self.rule, self.min_region, self.pixel_size, self.level_quantile, float(level))

    # ------------------------------------------------------------------ describing it
    @property
    def unit(self) -> str:
        """What areas are counted in: "px" (photo pixels) or "mm2"."""
        return "px" if self.pixel_size is None else "mm2"

    def describe(self) -> str:
        """The rule in words, as the command line prints it."""
        if self.rule == "region":
            return f"a region of >= {self.min_region:g} {'mm^2' if self.pixel_size else 'pixels'} above the threshold"
        level = "level not set" if self.level is None else f"level {self.level:.6g}"
        return f"the integrated anomaly of a region above the {self.level_quantile:g} quantile map level ({level})"

    # ------------------------------------------------------------------ judging a map
    def pixel_area(self, photo_size: Sequence[int], map_shape: Sequence[int]) -> float:
        """Area of one map pixel (in :attr:`unit`) for a map of ``map_shape`` (h, w) over a photo of (H, W)."""
        photo_pixels = (int(photo_size[0]) * int(photo_size[1])) / (int(map_shape[0]) * int(map_shape[1]))
        return photo_pixels * (self.pixel_size**2 if self.pixel_size is not None else 1.0)

    def min_pixels(self, pixel_area: float) -> int:
        """The smallest region in map pixels: min_region / pixel_area, rounded up, at least 1."""
        return max(1, math.ceil(self.min_region / pixel_area - 1e-9))

    def score(self, amap: np.ndarray, photo_size: Sequence[int]) -> float:
        """The image's score under the rule, from its (h, w) map over the whole photo of (H, W) pixels."""
        area = self.pixel_area(photo_size, amap.shape)
        if self.rule == "region":
            return region_level(amap, self.min_pixels(area))
        if self.level is None:
            raise DefectscopeError("an 'integrated' rule is judged only once its level is set by a fit")
        return region_stats(amap, self.level, area).integrated

    def outline_level(self, threshold: float) -> float:
        """The map level whose regions decide: the threshold ("region"), else the rule's level."""
        if self.rule == "region":
            return float(threshold)
        assert self.level is not None
        return self.level

    def regions(self, amap: np.ndarray, photo_size: Sequence[int], threshold: float) -> dict[str, Any]:
        """What the judgement rests on, JSON-ready: the level, the regions at or above it (``count``), how
        many of them are large enough to reject ("region": ``rejecting``), the largest area and the unit."""
        level = self.outline_level(threshold)
        area = self.pixel_area(photo_size, amap.shape)
        out: dict[str, Any] = {"level": level, "unit": self.unit}
        if self.rule == "region":
            labels, count = label_regions(amap, level)
            pixels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
            out |= {
                "count": count,
                "rejecting": int(np.count_nonzero(pixels >= self.min_pixels(area))),  # as score() counts
                "largest_area": float(pixels.max()) * area if count else 0.0,
            }
        else:
            stats = region_stats(amap, level, area)
            out |= {"count": stats.count, "largest_area": stats.largest, "integrated": stats.integrated}
        return out
