"""Run an exported model with onnxruntime or OpenVINO, without torch.

:func:`load_exported` reads an export folder (see :mod:`defectscope.export`), verifies its files
against the checksums written with it and returns a :class:`RuntimeDetector`: the few things
:mod:`defectscope.scoring` and :class:`defectscope.api.Model` ask of a detector (``predict``,
``image_size``, ``input_stats``, ``method``, ``backbone``, ``layers``), backed by the runtime. So
``defectscope.load(DIR).predict(...)``, ``defectscope predict DIR ...`` and every front end going
through the API score an exported model unchanged.

Images are decoded as for the torch path, then resized with :mod:`defectscope.export.preprocess`
(numpy and Pillow) through the loader's ``prepare`` hook; normalisation and everything after it
run inside the graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DefectscopeError, ModelFileError
from . import EXPORT_FILE, FORMAT_NAME, FORMAT_VERSION, INSTALL_HINT, RUNTIMES, threads
from .preprocess import prepare as _prepare

log = logging.getLogger(__name__)

__all__ = ["Prediction", "RuntimeDetector", "file_sha256", "json_checksum", "load_exported"]

#: the runtime each graph format runs on unless told otherwise (see the README, "Exported models")
DEFAULT_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino"}
CHECKSUM_KEY = "export_sha256"
#: the region of interest of an export made from a model with one: (S, S) PNG, white inside. The graph
#: applies the region itself; the file is what overlays dim by (and what a person can look at)
ROI_FILE = "roi.png"


@dataclass
class Prediction:
    """scores (N,) float32 and maps (N, S, S) float32, as :class:`defectscope.detectors.base.Prediction`."""

    scores: np.ndarray
    maps: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


class RuntimeDetector:
    """An exported model behind the detector interface the API uses.

    ``prepare`` is the loader's hook: images become (3, S, S) float32 numpy arrays in [0, 1].
    ``predict`` runs the graph in runs of at most ``images_per_run`` images (PatchCore's distance
    matrix is images x patches x bank entries floats; the exporter sizes runs to 256 MB).
    """

    is_fitted = True

    def __init__(self, folder: Path, meta: dict[str, Any], runtime: str, n_threads: int) -> None:
        export = meta["export"]
        self.folder = folder
        self.meta = meta
        self.method: str = meta["method"]
        self.backbone: str = meta["backbone"]
        self.layers: list[str] = list(meta.get("layers") or [])
        self.image_size: int = int(meta["image_size"])
        self.resize = "stretch"  # exports are made from stretch-protocol models only
        norm = meta["normalization"]
        self.input_stats = (tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"]))
        self.runtime = runtime
        self.threads = n_threads
        self.images_per_run = max(1, int(export.get("images_per_run", 8)))
        graph = folder / export["graph"]
        self._run = _onnxruntime(graph, n_threads) if runtime == "onnxruntime" else _openvino(graph, n_threads)
        self._roi = _read_roi(folder / export["roi"], self.input_shape) if export.get("roi") else None

    def __repr__(self) -> str:
        return f"<RuntimeDetector {self.method} on {self.runtime} from {self.folder}>"

    @property
    def input_shape(self) -> tuple[int, int]:
        """(S, S): exports are square, untiled models only."""
        return (self.image_size, self.image_size)

    def roi_mask(self) -> np.ndarray | None:
        """The region of interest, (S, S) bool, or None (as :meth:`Detector.roi_mask`)."""
        return None if self._roi is None else self._roi.copy()

    @staticmethod
    def prepare(image: np.ndarray, size: int | tuple[int, int], mean: Any = (), std: Any = ()) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, S, S) float32 in [0, 1] (see :mod:`defectscope.export.preprocess`);
        ``size`` is S or (S, S)."""
        if not isinstance(size, int):
            if len(size) != 2 or size[0] != size[1]:
                raise DefectscopeError(f"exported models take square inputs, not {size}")
            size = int(size[0])
        return _prepare(image, size, mean, std)

    def predict(self, images: np.ndarray) -> Prediction:
        """Score (N, 3, S, S) float32 images in [0, 1]: scores (N,), maps (N, S, S)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        size = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise DefectscopeError(f"expected images shaped (N, 3, {size}, {size}), got {images.shape}")
        if not len(images):
            return Prediction(np.zeros(0, np.float32), np.zeros((0, size, size), np.float32))
        scores, maps = [], []
        for lo in range(0, len(images), self.images_per_run):
            s, m = self._run(images[lo : lo + self.images_per_run])
            scores.append(np.asarray(s, dtype=np.float32).reshape(-1))
            maps.append(np.asarray(m, dtype=np.float32))
        return Prediction(np.concatenate(scores), np.concatenate(maps))


def _read_roi(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The export's region of interest picture as an (S, S) bool array (its checksum is verified on load)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) >= 128
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read the region of interest ({exc}); export the model again") from exc
    if mask.shape != shape:
        raise ModelFileError(f"{path}: the region of interest is not {shape[1]}x{shape[0]}; export the model again")
    return mask


def _missing(runtime: str, exc: ImportError) -> DefectscopeError:
    return DefectscopeError(
        f"running an exported model with {runtime} needs the {runtime} package ({exc}): {INSTALL_HINT}"
    )


def _onnxruntime(graph: Path, n_threads: int) -> Any:
    """A callable images -> (scores, maps) on an onnxruntime CPU session."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise _missing("onnxruntime", exc) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = n_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's business
    try:
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelFileError(f"{graph}: onnxruntime cannot load this graph ({str(exc).splitlines()[0]})") from exc

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = session.run(["scores", "maps"], {"images": images})
        return scores, maps

    return run


def _openvino(graph: Path, n_threads: int) -> Any:
    """A callable images -> (scores, maps) on an OpenVINO CPU compiled model, in float32.

    OpenVINO would otherwise compute in bfloat16 on CPUs that have it, far outside the parity
    tolerance; ``INFERENCE_PRECISION_HINT`` f32 keeps float32 everywhere.
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise _missing("openvino", exc) from None
    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": n_threads,
        "INFERENCE_PRECISION_HINT": "f32",
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
    }
    try:
        compiled = core.compile_model(str(graph), "CPU", config)
    except Exception as exc:
        raise ModelFileError(f"{graph}: OpenVINO cannot load this graph ({str(exc).splitlines()[0]})") from exc
    request = compiled.create_infer_request()
    out_scores, out_maps = compiled.output("scores"), compiled.output("maps")

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = request.infer({"images": images})
        return np.array(result[out_scores]), np.array(result[out_maps])

    return run


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_checksum(meta: dict[str, Any]) -> str:
    """sha256 over the export metadata without its own checksum, as canonical JSON."""
    rest = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def read_export_meta(folder: str | Path) -> dict[str, Any]:
    """The export folder's metadata, validated (format, version, checksum, graph files present and intact)."""
    folder = Path(folder)
    path = folder / EXPORT_FILE
    if not folder.exists():
        raise ModelFileError(f"{folder}: exported model folder not found")
    if not path.is_file():
        raise ModelFileError(
            f"{folder}: is a folder without {EXPORT_FILE}, not an exported model (give a model file, "
            "or a folder written by `defectscope export`)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from exc
    if (
        not isinstance(meta, dict)
        or meta.get("export_format") != FORMAT_NAME
        or not isinstance(meta.get("export"), dict)
    ):
        raise ModelFileError(f"{path}: not a defectscope export (format {meta.get('export_format')!r})")
    version = meta.get("export_format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{folder}: export format version {version} is newer than this defectscope supports "
            f"({FORMAT_VERSION}); upgrade defectscope"
        )
    if meta.get(CHECKSUM_KEY) != json_checksum(meta):
        raise ModelFileError(
            f"{path}: damaged or edited by hand: its content does not match the checksum written "
            "with it; export the model again"
        )
    for name, digest in meta["export"]["files"].items():
        file = folder / name
        if not file.is_file():
            raise ModelFileError(f"{folder}: {name} is missing; export the model again")
        if file_sha256(file) != digest:
            raise ModelFileError(
                f"{file}: damaged or replaced: it does not match the checksum in {EXPORT_FILE}; export the model again"
            )
    return meta


def load_exported(folder: str | Path, runtime: str | None = None) -> tuple[RuntimeDetector, dict[str, Any]]:
    """(detector, metadata) of an exported model. ``runtime``: "onnxruntime" or "openvino" (an
    OpenVINO-format export runs on openvino only); None: :data:`DEFAULT_RUNTIME` of its format."""
    folder = Path(folder)
    meta = read_export_meta(folder)
    fmt = meta["export"]["format"]
    runtime = runtime or DEFAULT_RUNTIME[fmt]
    if runtime not in RUNTIMES:
        raise DefectscopeError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    if fmt == "openvino" and runtime != "openvino":
        raise DefectscopeError(
            f"{folder}: an OpenVINO export runs on openvino only; export with --format onnx for {runtime}"
        )
    return RuntimeDetector(folder, meta, runtime, threads()), meta
