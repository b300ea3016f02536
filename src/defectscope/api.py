"""The Python API: load or fit a model, score images, read the results.

Every front end (the command line, ``serve``, ``batch``, ``benchmark``, ``demo``) goes through
this module, so a program that embeds defectscope gets exactly what the command line gives::

    import defectscope

    model = defectscope.load("bottle.dsmodel")
    result = model.predict("photo.png")            # a path, a PIL image or a numpy array
    result.score, result.judgement                  # float, 0 good / 1 defective
    result.anomaly_map                              # (H, W) float32 over the photo as given
    picture = result.overlay()                      # (H', W', 3) uint8 RGB heatmap with legend

    model = defectscope.fit("data/bottle/train/good", method="patchcore")
    model.save("bottle.dsmodel")

A result never raises for a bad image: ``result.error`` holds the one-line message (the same as
the command line prints) and the other images of the call are scored as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from .errors import DefectscopeError, ModelFileError
from .export import RUNTIME_CHOICES

if TYPE_CHECKING:  # the heavy modules load on first use, not at import
    from .detectors.base import Detector

log = logging.getLogger(__name__)

__all__ = ["Model", "Result", "fit", "load"]


@dataclass
class Result:
    """The outcome for one image.

    score: the image's anomaly score (float, higher = more anomalous; the method's own scale), or
        None when the image could not be scored.
    judgement: 1 (defective: score >= threshold), 0 (good), or None with ``error``.
    threshold: the image threshold the judgement used.
    normalized_score: score / threshold (1.0 is the decision boundary), None when undefined.
    error: None, or a one-line message naming the image and the problem.
    name: the path as given, or ``"<array 0>"``-style names for in-memory images.
    notes: what of the file was not used as it is (extra frames, transparency), one phrase each.
    image_shape: the image's (H, W) as scored (after EXIF orientation).
    alignment: with an aligned model, {"aligned", "inliers", "angle"}.
    pixel_threshold: the map's threshold (what :attr:`region` and :meth:`overlay` use).

    The anomaly map is kept at the model's resolution and brought to the image's own size on
    first access of :attr:`anomaly_map` (bilinear).
    """

    score: float | None
    judgement: int | None
    threshold: float
    normalized_score: float | None
    error: str | None = None
    name: str = ""
    notes: list[str] = field(default_factory=list)
    image_shape: tuple[int, int] | None = None
    alignment: dict[str, Any] | None = None
    pixel_threshold: float | None = None
    _map: np.ndarray | None = field(default=None, repr=False)
    _image: np.ndarray | None = field(default=None, repr=False)
    _full_map: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when the image was scored."""
        return self.error is None

    @property
    def anomaly_map(self) -> np.ndarray | None:
        """(H, W) float32 anomaly map over the image as given (same scale as the pixel threshold), read-only
        (``.copy()`` it to change it); None when the image failed or maps were not asked for
        (``predict(..., maps=False)``)."""
        if self._map is None or self.image_shape is None:
            return None
        if self._full_map is None:
            from .report.heatmaps import resize_map

            self._full_map = resize_map(self._map, self.image_shape)
            self._full_map.flags.writeable = False  # shared with region and overlay(): copy it to change it
        return self._full_map

    @property
    def region(self) -> np.ndarray | None:
        """(H, W) bool: the pixels at or above the pixel threshold (None without a map)."""
        amap = self.anomaly_map
        if amap is None or self.pixel_threshold is None:
            return None
        return amap >= self.pixel_threshold

    def overlay(self, *, side_by_side: bool = False, legend: bool = True) -> np.ndarray:
        """The heatmap picture as an (H', W', 3) uint8 RGB array: the map over the photo, coloured
        against the pixel threshold, the defect region outlined, the verdict in a legend strip
        (see :func:`defectscope.report.heatmaps.overlay`). Raises DefectscopeError when the image
        failed or was scored without a map."""
        from .report.heatmaps import Verdict, overlay

        if not self.ok or self._map is None:
            raise DefectscopeError(f"{self.name}: no anomaly map to draw ({self.error or 'scored with maps=False'})")
        image = self._image
        if image is None:
            from .data.images import load_image

            image = load_image(self.name)
        assert self.score is not None and self.judgement is not None  # self.ok
        verdict = Verdict(score=float(self.score), threshold=self.threshold, judgement=int(self.judgement))
        pix = self.pixel_threshold if self.pixel_threshold is not None else self.threshold
        return overlay(image, self._map, pix, verdict=verdict, side_by_side=side_by_side, legend=legend)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready fields (no arrays): name, score, judgement, threshold, normalized_score, error,
        plus notes and alignment when present."""
        out: dict[str, Any] = {
            "name": self.name,
            "score": self.score,
            "judgement": self.judgement,
            "threshold": self.threshold,
            "normalized_score": self.normalized_score,
            "error": self.error,
        }
        if self.notes:
            out["notes"] = list(self.notes)
        if self.alignment is not None:
            out["alignment"] = dict(self.alignment)
        return out


class Model:
    """A fitted model: the detector, its metadata (threshold, pixel threshold, training summary)
    and its alignment, if fitted with one. Get one from :func:`load` or :func:`fit`."""

    def __init__(
        self,
        detector: Detector,
        meta: dict[str, Any],
        aligner: Any | None = None,
        path: Path | None = None,
        runtime: str | None = None,
    ) -> None:
        self.detector = detector
        self.meta = meta
        self.aligner = aligner
        self.path = path
        #: None: PyTorch; "onnxruntime" or "openvino": an exported model run on that runtime
        self.runtime = runtime
        #: why this runtime, in words (``load`` sets it; see :func:`choose_runtime`)
        self.runtime_reason = f"{runtime or 'torch'}, as asked"
        #: the runtime asked of :func:`load` ("auto" re-chooses on a reload)
        self.requested_runtime = runtime

    # ----------------------------------------------------------------- description
    @property
    def method(self) -> str:
        return self.detector.method

    @property
    def threshold(self) -> float:
        """The image threshold: a score at or above it is judged defective."""
        return float(self.meta["threshold"])

    @property
    def pixel_threshold(self) -> float:
        """The anomaly map's threshold (overlays and :attr:`Result.region`); models fitted before it
        existed fall back to the image threshold, with a warning."""
        from .scoring import pixel_threshold

        return pixel_threshold(self.meta)

    @property
    def checksum(self) -> str | None:
        """The sha256 written with the model file (None for a model not saved yet)."""
        return self.meta.get("sha256")

    def info(self) -> dict[str, Any]:
        """What a user asks of a model first: method, backbone, layers, image size, thresholds, the
        training data and date, the checksum and the file (``layer_weighting``: PatchCore's, else None)."""
        training = self.meta.get("training", {})
        return {
            "method": self.method,
            "backbone": self.detector.backbone,
            "layers": list(self.detector.layers or []),
            "image_size": self.detector.image_size,
            "resize": self.detector.resize,
            "threshold": self.threshold,
            "pixel_threshold": self.meta.get("pixel_threshold"),
            "fitted": training.get("created"),
            "n_train": training.get("n_images"),
            "align": (self.meta.get("align") or {}).get("mode", "none"),
            "checksum": self.checksum,
            "path": str(self.path) if self.path is not None else None,
            "runtime": self.runtime or "torch",
            "runtime_reason": self.runtime_reason,
            "tiles": getattr(self.detector, "tiles", 1),
            "tile_overlap": getattr(self.detector, "tile_overlap", None),
            "layer_weighting": getattr(self.detector, "layer_weighting", None),
        }

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path is not None else ""
        return f"<defectscope.Model {self.method} ({self.detector.backbone}), threshold {self.threshold:.6g}{where}>"

    # ----------------------------------------------------------------- scoring
    @overload
    def predict(
        self, images: Sequence[Any], *, maps: bool = ..., threshold: float | None = ..., batch_size: int = ...
    ) -> list[Result]: ...

    @overload
    def predict(
        self, images: Any, *, maps: bool = ..., threshold: float | None = ..., batch_size: int = ...
    ) -> Result: ...

    def predict(
        self, images: Any, *, maps: bool = True, threshold: float | None = None, batch_size: int = 16
    ) -> Result | list[Result]:
        """Score one image or a list of them.

        images: a file path (str or Path), a PIL image, a numpy array (H, W) or (H, W, C) with C in
            1, 3, 4 (RGB(A) order), of dtype uint8, uint16 (scaled by 65535) or float ([0, 1]
            scaled by 255, any other range stretched) — or a list/tuple of these.
        maps: keep each image's anomaly map (for :attr:`Result.anomaly_map`, :attr:`Result.region`
            and :meth:`Result.overlay`); False saves memory on long lists.
        threshold: judge against this instead of the model's threshold.
        Returns one :class:`Result` for one image, a list (same order) for a list. A file that
        cannot be read or an array of the wrong shape gives a result with ``error`` set; it
        never raises for one bad image.
        """
        if isinstance(images, (list, tuple)):
            return list(self.iter_predict(images, maps=maps, threshold=threshold, batch_size=batch_size))
        return next(self.iter_predict([images], maps=maps, threshold=threshold, batch_size=batch_size))

    def iter_predict(
        self,
        images: Iterable[Any],
        *,
        maps: bool = False,
        threshold: float | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> Iterator[Result]:
        """Yield one :class:`Result` per image, in input order, as soon as its batch is scored
        (images are decoded in a background thread meanwhile). Inputs as :meth:`predict`."""
        from .scoring import normalized_score, score_paths

        threshold = self.threshold if threshold is None else _finite(threshold, "threshold")
        batch_size = _positive_int(batch_size, "batch_size")
        sources, arrays = _sources(images)
        pix = self.pixel_threshold if maps else None
        for result in score_paths(
            self.detector,
            sources,
            threshold,
            batch_size=batch_size,
            keep_maps=maps,
            progress=progress,
            aligner=self.aligner,
        ):
            name = _name(result.path)
            yield Result(
                score=result.score,
                judgement=result.judgement,
                threshold=threshold,
                normalized_score=normalized_score(result.score, threshold) if result.ok else None,
                error=result.error,
                name=name,
                notes=list(result.notes),
                image_shape=result.size,
                alignment=result.alignment,
                pixel_threshold=pix,
                _map=result.map,
                _image=arrays.get(name) if maps else None,
            )

    def evaluate(self, data: str | Path | Any, **options: Any) -> dict[str, Any]:
        """Image and pixel metrics on a labelled test set (an MVTec AD / VisA / plain folder, or a
        :class:`defectscope.data.datasets.Split`); options as
        :func:`defectscope.evaluation.evaluate.evaluate_detector` (heatmap_dir, protocol, ...)."""
        from .data.layouts import load_category
        from .evaluation.evaluate import evaluate_detector

        split = load_category(Path(data)) if isinstance(data, (str, Path)) else data
        options.setdefault("pixel_threshold", self.meta.get("pixel_threshold"))
        threshold = _finite(options.pop("threshold", self.threshold), "threshold")
        return evaluate_detector(self.detector, split, threshold, aligner=self.aligner, **options)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write the model file (atomic: a half-written file never replaces a good one); returns
        the path. The checksum is recomputed and kept in :attr:`meta`."""
        from .common.files import OutputError, os_error_message
        from .io import read_metadata, save_model

        if not str(path).strip():
            raise OutputError("no model file name given: pass a path such as 'part.dsmodel'")
        extra = self.aligner.tensors() if self.aligner is not None else None
        try:
            path = save_model(path, self.detector, self.meta, extra_tensors=extra)
        except OSError as exc:  # the temporary file's name is ours, not the user's: name the target
            raise OutputError(f"{path}: could not write the model file ({os_error_message(exc, path)})") from exc
        self.meta = read_metadata(path)
        self.path = Path(path)
        return self.path


#: the runtime "auto" picks for an exportable model file: measured faster than torch at equal results
#: (benchmarks/bench_export.py; README "Exported models")
AUTO_RUNTIME = "onnxruntime"


def choose_runtime(path: str | Path, runtime: str | None) -> tuple[str | None, str]:
    """The runtime :func:`load` uses for ``path`` when asked for ``runtime``, and why, in words.

    "auto" gives onnxruntime for a model file that can be exported (PatchCore or PaDiM, no
    alignment, no tiles, the stretch protocol, a square input) when the export extra (onnx,
    onnxruntime) is installed, else torch; an exported folder runs on its own runtime (None and
    "auto" name it). None and "torch" give None (torch) for a model file. Raises DefectscopeError
    for an unknown runtime, and for "torch" with an exported folder (it has no torch model).
    """
    from .export import INSTALL_HINT, is_exported

    if runtime not in (None, *RUNTIME_CHOICES):
        raise DefectscopeError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIME_CHOICES)}")
    if is_exported(path) and runtime in ("torch", "auto", None):
        if runtime == "torch":
            raise DefectscopeError(
                f"{path}: is an exported model, which runs on onnxruntime or OpenVINO, not torch; "
                "give the model file it was exported from to score with torch"
            )
        import json

        from .export import EXPORT_FILE
        from .export.runtime import DEFAULT_RUNTIME

        try:  # the format only: the load that follows verifies the folder (and hashes its graph) once
            own = DEFAULT_RUNTIME[json.loads((Path(path) / EXPORT_FILE).read_text())["export"]["format"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None, "the exported model's own runtime"  # load says what is wrong with the folder
        return own, f"{own}: the exported model's own runtime"
    if runtime is None:
        return None, "torch (defectscope.load's default)"
    if runtime == "torch":
        return None, "torch, as asked"
    if runtime != "auto":
        return runtime, f"{runtime}, as asked"
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"torch: {' and '.join(missing)} not installed ({INSTALL_HINT} makes {AUTO_RUNTIME} the default)"
    from .export.exporter import export_refusal
    from .io import read_metadata

    try:
        reason = export_refusal(read_metadata(path))
    except (OSError, DefectscopeError):
        return None, "torch (the model file is checked as it loads)"
    if reason is not None:
        return None, f"torch: {reason}"
    return AUTO_RUNTIME, f"{AUTO_RUNTIME}: the model's export, faster than torch at equal results"


def check_model_output(path: str | Path, what: str = "model file") -> Path:
    """Fail now, naming ``path``, if a model file cannot be written there later: a folder, an
    unwritable place, or an existing file that is not a defectscope model. Raises
    :class:`~defectscope.common.files.OutputError`; use before the long work."""
    from .common.files import check_output_file
    from .io import MODEL_FILE

    return check_output_file(path, what, replaces=MODEL_FILE)


def load(path: str | Path, *, align: str | None = None, runtime: str | None = None) -> Model:
    """Load a model file written by ``defectscope fit`` or :meth:`Model.save`, or a folder written by
    ``defectscope export``.

    Nothing is unpickled; the file's checksum is verified. Raises ModelFileError naming the file
    when it is missing, damaged, edited by hand, or not a defectscope model. ``align`` overrides the
    alignment the model was fitted with ("none" scores without it; another mode must be one the
    model's reference supports).

    An exported model runs on onnxruntime or OpenVINO without importing torch; ``runtime``
    ("onnxruntime" or "openvino") overrides the export's default (see :mod:`defectscope.export`).
    A model file with a ``runtime`` is exported once into the cache (``$DEFECTSCOPE_CACHE/exports``)
    and that export is run. ``runtime="auto"`` (what ``serve`` and ``batch`` use by default) runs a
    model file on onnxruntime when it can be exported and the export extra is installed, else on
    torch (see :func:`choose_runtime`; an export that fails falls back to torch with a warning);
    :attr:`Model.runtime` and :attr:`Model.runtime_reason` say which and why.
    """
    from .export import is_exported

    chosen, reason = choose_runtime(path, runtime)  # an unknown runtime, or torch for an export: refused here
    if runtime == "auto":
        if chosen is not None and not is_exported(path) and align not in (None, "none"):
            chosen, reason = None, f"torch: --align {align} runs before the model, outside an exported graph"
        if chosen is None:
            model = _load_chosen(path, align, None)
        else:
            try:
                model = _load_chosen(path, align, chosen)
            except ModelFileError:  # the model file itself is missing, damaged or edited: never scored
                raise
            except (DefectscopeError, OSError) as exc:  # the export failed: its agreement check, an unwritable cache
                from .common.files import os_error_message

                why = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
                if is_exported(path):
                    raise
                log.warning("%s: no %s export (%s); scoring with torch", path, chosen, why)
                model, reason = _load_chosen(path, align, None), f"torch: the {chosen} export failed ({why})"
        model.runtime_reason, model.requested_runtime = reason, "auto"
        return model
    if runtime == "torch":
        runtime = None

    model = _load_chosen(path, align, runtime)
    model.runtime_reason = reason
    return model


def _load_chosen(path: str | Path, align: str | None, runtime: str | None) -> Model:
    """:func:`load` once the runtime is chosen (None: torch for a model file, the export's own for a folder)."""
    from .export import is_exported

    if is_exported(path):
        from .export.runtime import load_exported

        if align not in (None, "none"):
            raise DefectscopeError(f"--align {align}: exported models are scored without alignment")
        exported, meta = load_exported(path, runtime)
        return Model(exported, meta, None, Path(path), runtime=exported.runtime)  # type: ignore[arg-type]
    if runtime is not None:  # a model file on a runtime: its export, made once into the cache
        from .export.exporter import cached_export

        if align not in (None, "none"):
            raise DefectscopeError(f"runtime={runtime!r}: exported models are scored without alignment")
        folder = cached_export(path)
        try:
            model = load(folder, runtime=runtime)
        except ModelFileError:  # a damaged cache entry (a file deleted, a disk error): made again, once
            import shutil

            log.warning("%s: the cached export is damaged; exporting %s again", folder, path)
            shutil.rmtree(folder, ignore_errors=True)
            model = load(cached_export(path), runtime=runtime)
        model.path, model.runtime = Path(path), runtime  # a reload re-exports the file if it changed
        return model
    from .components.align import Aligner
    from .features.traced import use_cached_extractor
    from .io import load_model_with_extras

    detector, meta, extras = load_model_with_extras(path)
    aligner = Aligner.from_model(meta.get("align"), extras, align)
    use_cached_extractor(detector, meta.get("weights"))  # the next process starts without timm
    return Model(detector, meta, aligner, Path(path))


def fit(
    images: str | Path | Sequence[str | Path],
    *,
    method: str = "patchcore",
    align: str = "none",
    align_ref: str | Path | None = None,
    threshold_quantile: float | None = None,
    exclude_outliers: bool = False,
    batch_size: int = 16,
    progress: bool = False,
    data_name: str | None = None,
    **params: Any,
) -> Model:
    """Learn a model from good images only.

    images: a folder (``train/good`` of an MVTec AD category, ``train/Normal`` of VisA, else every
        image under it) or a list of image paths.
    method: "patchcore" (default), "padim" or "spade".
    align: "none", "rot90", "rigid", "silhouette" or "auto" (see ``defectscope fit --help``);
        align_ref is the reference image (default: the first training image).
    threshold_quantile: the quantile of held-out good scores that becomes the threshold (default
        :data:`defectscope.fitting.DEFAULT_THRESHOLD_QUANTILE`).
    exclude_outliers: fit again without training images whose held-out score is an outlier.
    data_name: how the training data is named in the model's metadata (default: the folder, or
        "N image files").
    params: the method's parameters (backbone, layers, image_size, coreset_ratio, ...; see the
        detector classes in :mod:`defectscope.detectors`).
    Returns the fitted :class:`Model` (not saved: call :meth:`Model.save`). Raises DefectscopeError
    for an unknown method or parameter, a missing folder or too few images, before any work.
    """
    from .data.layouts import good_images
    from .detectors import make_detector
    from .fitting import DEFAULT_THRESHOLD_QUANTILE, fit_detector

    detector = make_detector(method, **params)
    detector._validate_params()
    batch_size = _positive_int(batch_size, "batch_size")
    if threshold_quantile is not None:
        threshold_quantile = _finite(threshold_quantile, "threshold_quantile")
    if not isinstance(images, (str, Path)):
        if not isinstance(images, (list, tuple)):
            raise DefectscopeError(f"fit takes a folder or a list of image file paths, got {type(images).__name__}")
        odd = [type(p).__name__ for p in images if not isinstance(p, (str, Path))]
        if odd:
            raise DefectscopeError(
                f"fit takes image file paths, not {odd[0]} ({len(odd)} of {len(images)} items): "
                "save in-memory images to files first (the fit reads them more than once)"
            )
    if isinstance(images, (str, Path)):
        paths = good_images(Path(images))
        data_name = data_name or str(images)
    else:
        paths = [Path(p) for p in images]
        data_name = data_name or f"{len(paths)} image files"
    aligner, auto = _fit_aligner(align, align_ref, paths, detector)
    meta = fit_detector(
        detector,
        paths,
        batch_size=batch_size,
        threshold_quantile=DEFAULT_THRESHOLD_QUANTILE if threshold_quantile is None else threshold_quantile,
        progress=progress,
        data_name=data_name,
        aligner=aligner,
        exclude_outliers=exclude_outliers,
    )
    if aligner is not None:
        meta["align"] = aligner.config() | ({"auto": auto} if auto is not None else {})
    for item in meta["training"]["skipped"]:  # never silently: the threshold rests on fewer images than given
        log.warning("skipped training image %s", item["error"])
    return Model(detector, meta, aligner)


def _fit_aligner(
    mode: str, ref: str | Path | None, paths: list[Path], detector: Detector
) -> tuple[Any | None, dict[str, Any] | None]:
    """The aligner a fit uses (None for "none") and, for "auto", the record of what it chose and why."""
    if mode == "none":
        return None, None
    from .components.align import AUTO_IMAGES, choose_aligner, make_aligner
    from .data.images import load_image

    if len(paths) < detector.min_train_images:  # say that first, before any alignment work
        raise DefectscopeError(
            f"found {len(paths)} training image(s), {detector.method} needs at least {detector.min_train_images}"
        )
    ref = Path(ref) if ref is not None else paths[0]
    if mode == "auto":
        sample = [load_image(p) for p in paths[1 : 1 + AUTO_IMAGES]]
        return choose_aligner(load_image(ref), sample, reference=str(ref))
    return make_aligner(mode, load_image(ref), reference=str(ref)), None


def _finite(value: Any, name: str) -> float:
    """``value`` as a finite float, else DefectscopeError naming ``name`` (a NaN threshold would pass every part)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DefectscopeError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(number):
        raise DefectscopeError(f"{name} must be a finite number, got {value!r}")
    return number


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DefectscopeError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _sources(images: Iterable[Any]) -> tuple[list[Any], dict[str, np.ndarray]]:
    """Paths stay paths; in-memory images become :class:`ArrayImage` s named ``<array i>`` (their
    conversion errors are reported per image). Returns the sources and the arrays by name."""
    from .data.loader import ArrayImage

    sources: list[Any] = []
    arrays: dict[str, np.ndarray] = {}
    for i, item in enumerate(images):
        if isinstance(item, (str, Path)):
            sources.append(Path(item))
        else:
            source = ArrayImage.of(item, f"<image {i}>")
            sources.append(source)
            if source.image is not None:
                arrays[source.name] = source.image
    return sources, arrays


def _name(source: Any) -> str:
    return source.name if hasattr(source, "image") else str(source)
