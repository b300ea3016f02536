"""Write an exported model: the scoring graph (ONNX, or OpenVINO IR converted from it) and its metadata.

Needs torch (the graph is traced from the detector) and onnx; ``--format openvino`` needs openvino.
Before the folder is written, the export scores a few images with the torch model and with the
runtime and records how far they agree (``export.agreement`` in the metadata), so every exported
model says by how much it differs from its model file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..common.files import OutputError
from ..errors import DefectscopeError, ModelFileError
from ..version import __version__
from . import EXPORT_FILE, FORMAT_NAME, FORMAT_VERSION, FORMATS, INSTALL_HINT

log = logging.getLogger(__name__)

__all__ = ["MAP_TOL", "OPSET", "SCORE_RTOL", "cached_export", "export_model", "export_refusal", "measure_agreement"]

#: ONNX opset written (Resize, Pad reflect, Gather/ArgMax as used here are all older than this)
OPSET = 17
#: the agreement the exported graph is held to (issue #16): relative score difference, map
#: difference as a fraction of the map's range, and identical judgements
SCORE_RTOL = 1e-4
MAP_TOL = 1e-3
#: largest PatchCore distance matrix (images x patches x bank entries, float32) one run may hold
RUN_BYTES = 256 * 2**20
#: images the export scores with both paths when no --check images are given
CHECK_IMAGES = 4


def export_model(
    model_path: str | Path, output: str | Path, fmt: str = "onnx", *, check_images: Sequence[str | Path] = ()
) -> dict[str, Any]:
    """Export the model file ``model_path`` into the new (or empty) folder ``output``.

    fmt: "onnx" or "openvino". check_images: image files scored by both paths for the recorded
    agreement (default: :data:`CHECK_IMAGES` synthetic images of another size than the model's, so the
    resize is part of the check). Returns the export metadata. Raises DefectscopeError with what
    to do for: an unknown format, a missing package, a non-empty output folder, a folder or an
    export given as the model, a model file from an older defectscope, an aligned or SPADE model.
    """
    if fmt not in FORMATS:
        raise DefectscopeError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    _require("onnx", "exporting")
    _require("onnxruntime" if fmt == "onnx" else "openvino", "checking the export")
    if fmt == "openvino":
        _require("openvino", "exporting to OpenVINO")
    output = Path(output)
    _check_output(output)
    detector, meta = _load_source(Path(model_path))

    from .graph import scoring_graph

    graph = scoring_graph(detector)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        onnx_path = work / "model.onnx"
        _write_onnx(graph, detector.image_size, onnx_path)
        if fmt == "openvino":
            _write_openvino(onnx_path, work / "model.xml")
            onnx_path.unlink()
            graph_file, files = "model.xml", ["model.xml", "model.bin"]
        else:
            graph_file, files = "model.onnx", ["model.onnx"]
        from .runtime import CHECKSUM_KEY, DEFAULT_RUNTIME, ROI_FILE, file_sha256, json_checksum

        roi = {}
        if detector.roi_ is not None:  # in the graph already; the picture is for overlays (and people)
            from PIL import Image

            Image.fromarray(detector.roi_.numpy().astype("uint8") * 255).save(work / ROI_FILE)
            files.append(ROI_FILE)
            roi = {"roi": ROI_FILE}

        out = dict(meta.items())
        out.update(
            export_format=FORMAT_NAME,
            export_format_version=FORMAT_VERSION if meta.get("judge") else 1,
            export={
                "format": fmt,
                "graph": graph_file,
                "files": {name: file_sha256(work / name) for name in files},
                "opset": OPSET,
                "runtime": DEFAULT_RUNTIME[fmt],
                "input": {
                    "name": "images",
                    "shape": ["N", 3, detector.image_size, detector.image_size],
                    "dtype": "float32",
                    "range": [0.0, 1.0],
                    "resize": "bilinear, antialiased, outside the graph (Pillow, float32 per channel)",
                },
                "outputs": {"scores": ["N"], "maps": ["N", detector.image_size, detector.image_size]},
                "images_per_run": _images_per_run(detector),
                **roi,
                "source": {"path": str(Path(model_path).resolve()), "sha256": meta.get("sha256")},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "package_version": __version__,
            },
        )
        out[CHECKSUM_KEY] = json_checksum(out)
        (work / EXPORT_FILE).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        out["export"]["agreement"] = measure_agreement(detector, work, meta, check_images)
        out[CHECKSUM_KEY] = json_checksum(out)
        (work / EXPORT_FILE).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        _move_into_place(work, output)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def cached_export(model_path: str | Path) -> Path:
    """The ONNX export of a model file, made once into ``$DEFECTSCOPE_CACHE/exports/<model sha256>-onnx``
    (what ``defectscope.load(MODEL, runtime=...)`` runs); an export made meanwhile by another process is used.

    The model file is read and its checksum verified first, exactly as a torch load does, so a damaged or
    hand-edited file is refused even when an export of the original is cached. A cache entry that is not a
    complete export (a leftover folder without its metadata, or a file) is removed and made again: exports
    are written elsewhere and renamed into place, so an incomplete entry is never one being written.
    """
    from ..features.weights import cache_dir
    from ..io import read_model_file

    model_path = Path(model_path)
    if model_path.is_dir():
        _load_source(model_path)  # says what is wrong (an export, a folder)
    _, meta = read_model_file(model_path)  # ModelFileError for a missing, damaged or edited file
    checksum = meta.get("sha256")
    if checksum is None:
        _load_source(model_path)  # says what is wrong (an older file)
        raise ModelFileError(f"{model_path}: has no checksum to name its export by; fit it again")
    folder = cache_dir() / "exports" / f"{checksum}-onnx"
    if (folder / EXPORT_FILE).is_file():
        return folder
    if folder.is_dir() or folder.is_file() or folder.is_symlink():  # an incomplete entry: made again
        log.warning("%s: incomplete cached export; exporting %s again", folder, model_path)
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)
    try:
        export_model(model_path, folder, "onnx")
    except (OSError, DefectscopeError):
        if not (folder / EXPORT_FILE).is_file():  # not another process's export landing first
            raise
    return folder


def _require(module: str, purpose: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DefectscopeError(f"{purpose} needs the {module} package, which is not installed: {INSTALL_HINT}")


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: is a file; export writes a folder: give a new folder name")
    if output.is_dir() and any(output.iterdir()):
        raise OutputError(
            f"{output}: the folder is not empty; export into a new or empty folder (an earlier export "
            "is never overwritten)"
        )
    parent = output.parent if str(output.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: permission denied (cannot create {output.name} there)")


def export_refusal(meta: dict[str, Any]) -> str | None:
    """Why the model file with metadata ``meta`` cannot be exported, or None when it can (checked
    from the metadata alone, before anything is loaded)."""
    missing = [key for key in ("sha256", "pixel_threshold", "normalization") if key not in meta]
    if missing:
        remedy = (
            "`defectscope calibrate` writes one"
            if missing == ["sha256"]
            else "fit the model again with this version to export it"
        )
        return (
            f"written by an older defectscope (no {', '.join(missing).replace('_', ' ')} in its metadata), which "
            f"an export must carry; {remedy}"
        )
    if meta.get("method") == "spade":
        from .graph import REFUSED

        return f"SPADE models cannot be exported: {REFUSED['spade']}"
    if (meta.get("align") or {}).get("mode", "none") != "none":
        return (
            "models fitted with --align cannot be exported yet (the alignment runs in OpenCV before the model, "
            "outside any graph); fit without --align to export"
        )
    params = meta.get("params") or {}
    if params.get("tiles", 1) != 1:
        return (
            f"tiled models (--tile {params['tiles']}) cannot be exported yet (the graph takes one input per "
            "image, not its tiles); fit without --tile to export"
        )
    if params.get("resize", "stretch") != "stretch" or not isinstance(meta.get("image_size"), int):
        size = meta.get("image_size")
        shown = f"{size[1]}x{size[0]}" if isinstance(size, (list, tuple)) and len(size) == 2 else size
        return (
            f"only models with a square input and the stretch protocol can be exported yet (this one: image "
            f"size {shown}, --resize {params.get('resize', 'stretch')}); the torch-free resize "
            "reproduces stretch only"
        )
    return None


def _load_source(path: Path) -> tuple[Any, dict[str, Any]]:
    """The fitted detector and metadata of a current model file; refusals with what to do."""
    from ..io import load_model_with_extras, read_metadata

    if path.is_dir():
        if (path / EXPORT_FILE).is_file():
            raise DefectscopeError(f"{path}: is already an exported model; export the model file it came from")
        raise ModelFileError(f"{path}: is a folder, not a model file")
    meta = read_metadata(path) if path.exists() else None
    if meta is not None:
        missing = [key for key in ("sha256", "pixel_threshold", "normalization") if key not in meta]
        if missing:
            raise ModelFileError(
                f"{path}: written by an older defectscope (no {', '.join(missing).replace('_', ' ')} in its metadata), "
                "which an export must carry; fit the model again with this version, then export it"
            )
        reason = export_refusal(meta)
        if reason is not None:
            raise DefectscopeError(f"{path}: {reason}")
    detector, meta, _ = load_model_with_extras(path)
    return detector, meta


def _write_onnx(graph: Any, size: int, path: Path) -> None:
    """Trace the graph (TorchScript exporter: no onnxscript needed) with a dynamic batch axis."""
    import torch

    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic (sizes are fixed)
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["scores", "maps"],
            dynamic_axes={"images": {0: "N"}, "scores": {0: "N"}, "maps": {0: "N"}},
        )
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def _write_openvino(onnx_path: Path, xml: Path) -> None:
    """Convert to OpenVINO IR, weights kept in float32 (save_model halves them by default)."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml), compress_to_fp16=False)


def _images_per_run(detector: Any) -> int:
    """Images per graph run: PatchCore's distance matrix (patches x bank x 4 bytes per image) within RUN_BYTES."""
    if detector.method != "patchcore":
        return 8
    h, w = detector.grid_
    per_image = h * w * int(detector.memory_bank_.shape[0]) * 4
    return int(max(1, min(8, RUN_BYTES // max(1, per_image))))


def _check_images(paths: Sequence[str | Path], size: int) -> tuple[list[np.ndarray], str]:
    from ..data.images import load_image

    if paths:
        return [load_image(p) for p in paths], f"{len(paths)} given images"
    rng = np.random.default_rng(0)
    images = []
    for i in range(CHECK_IMAGES):  # smooth random textures, not S x S, so the resize is checked too
        h, w = size + 37 + 11 * i, size + 53 - 7 * i
        low = rng.random((h // 16 + 2, w // 16 + 2, 3))
        big = np.kron(low, np.ones((16, 16, 1)))[:h, :w]
        noise = rng.normal(0, 0.05, (h, w, 3))
        images.append(np.clip((big + noise) * 255, 0, 255).astype(np.uint8))
    return images, f"{CHECK_IMAGES} synthetic images"


def measure_agreement(
    detector: Any, folder: Path, meta: dict[str, Any], check_images: Sequence[str | Path] = ()
) -> dict[str, Any]:
    """Score images with the torch detector and the exported folder; the largest differences.

    Returns max_score_rel (|s_export / s_torch - 1|), max_map_diff (|map difference| / torch map
    range, per image), judgements_equal, n_images, images (what was scored), within (all three in
    tolerance: :data:`SCORE_RTOL`, :data:`MAP_TOL`, equal judgements). Logs a warning when not within.
    """
    import torch

    from ..data.images import preprocess
    from .runtime import load_exported

    images, source = _check_images(check_images, detector.image_size)
    mean, std = detector.input_stats
    size = detector.image_size
    reference = detector.predict(torch.stack([preprocess(im, size, mean, std) for im in images]))
    runtime, _ = load_exported(folder)
    exported = runtime.predict(np.stack([runtime.prepare(im, size) for im in images]))
    threshold = float(meta["threshold"])
    rel = np.abs(exported.scores.astype(np.float64) / reference.scores.astype(np.float64) - 1.0)
    ranges = np.ptp(reference.maps.reshape(len(images), -1), axis=1).astype(np.float64)
    map_diff = np.abs(exported.maps - reference.maps).reshape(len(images), -1).max(axis=1) / np.maximum(ranges, 1e-12)
    judged = bool(((exported.scores >= threshold) == (reference.scores >= threshold)).all())
    result = {
        "max_score_rel": float(rel.max()),
        "max_map_diff": float(map_diff.max()),
        "judgements_equal": judged,
        "n_images": len(images),
        "images": source,
        "runtime": runtime.runtime,
    }
    result["within"] = bool(result["max_score_rel"] <= SCORE_RTOL and result["max_map_diff"] <= MAP_TOL and judged)
    if not result["within"]:
        log.warning(
            "the exported model differs from the model file more than allowed on %s: scores %.2g relative, "
            "maps %.2g of their range, judgements %s",
            source,
            result["max_score_rel"],
            result["max_map_diff"],
            "equal" if judged else "DIFFERENT",
        )
    return result


def _move_into_place(work: Path, output: Path) -> None:
    """The finished folder becomes ``output`` (an empty ``output`` is replaced)."""
    if output.is_dir():
        output.rmdir()  # empty (checked): os.replace cannot put a folder onto an existing one elsewhere
    os.chmod(work, 0o777 & ~_umask())
    os.replace(work, output)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
