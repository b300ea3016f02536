"""The model file: one safetensors file holding the learned tensors and JSON metadata.

The JSON sits in the safetensors header (``__metadata__["defectscope"]``), so a model is a
single file that loads without unpickling anything. Writes go to a temporary file in the
same folder that replaces the target only once complete, so a crash never leaves a half
file in place of a good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from .common.files import FileKind, OutputError, replacing
from .components.roi import ROI_TENSOR
from .detectors import NEUTRAL_PARAMS, detector_class, make_detector
from .detectors.base import Detector
from .errors import DefectscopeError, ModelFileError
from .features.normalization import LEGACY_NORMALIZATION
from .version import MODEL_FORMAT_VERSION, __version__

FORMAT_NAME = "defectscope-model"
FORMAT_VERSION = MODEL_FORMAT_VERSION
_META_KEY = "defectscope"
#: tensor-name prefixes of model parts that are not the detector's state (the alignment reference, the
#: region of interest)
EXTRA_PREFIXES: tuple[str, ...] = ("align.", "roi.")

log = logging.getLogger(__name__)


def format_version(meta: dict[str, Any], *, has_roi: bool = False) -> int:
    """The oldest format that reads a model with metadata ``meta`` correctly: 2 for a model judged by a
    region rule (an older reader would ignore the rule and judge the rule's threshold against the max
    score) or over a region of interest (an older reader would ignore the region and judge the whole
    image), else 1, which every version reads."""
    return FORMAT_VERSION if meta.get("judge") or has_roi else 1


def save_model(
    path: str | Path, detector: Detector, metadata: dict[str, Any], extra_tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``detector`` and ``metadata`` to ``path`` atomically; returns the path.

    ``metadata`` holds run information (threshold, training summary, ...); the method, its
    parameters, the backbone and format fields are added here. ``extra_tensors`` are stored
    beside the detector's state; their names must start with one of :data:`EXTRA_PREFIXES`. A
    detector's region of interest is stored as ``roi.mask`` ((H_in, W_in) uint8, 1 inside) (and restored by :func:`load_model`);
    a model without one has no such tensor, as files written before regions existed.
    """
    path = Path(path)
    mean, std = detector.input_stats
    meta = dict(metadata)
    meta.update(
        format=FORMAT_NAME,
        format_version=format_version(meta, has_roi=detector.roi_ is not None),
        package_version=__version__,
        method=detector.method,
        params=detector.get_params(),
        backbone=detector.backbone,
        layers=list(detector.layers or []),
        image_size=detector.image_size,
        resize=detector.resize,
        seed=detector.seed,
        weights=detector.extractor.weights_info,
        normalization={"name": detector.normalization, "mean": list(mean), "std": list(std)},
    )
    tensors = detector.state_dict()
    if detector.roi_ is not None:
        tensors[ROI_TENSOR] = detector.roi_.to(torch.uint8).contiguous()
    for name, value in (extra_tensors or {}).items():
        if not name.startswith(EXTRA_PREFIXES) or name in tensors:
            raise ValueError(f"extra tensor name {name!r} must start with one of {EXTRA_PREFIXES}")
        tensors[name] = value.detach().cpu().contiguous()
    write_model_file(path, tensors, meta)
    return path


#: metadata key of the checksum over the whole file's content (tensors and the rest of the metadata)
CHECKSUM_KEY = "sha256"


def model_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """sha256 (hex) over every tensor's name, dtype, shape and bytes, in name order, then the metadata
    (without this checksum) as canonical JSON.

    Stored in the metadata under ``sha256`` and verified on load: a model whose tensor bytes or
    header were damaged or edited by hand (a threshold, a parameter) is refused instead of judging
    wrongly. Tools that change the metadata (``calibrate``) write a new checksum.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    rest = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(rest, sort_keys=True).encode())
    return digest.hexdigest()


def write_model_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write tensors + metadata (temporary file, fsync, rename; see :mod:`defectscope.common.files`).

    ``meta["sha256"]`` is set to :func:`model_checksum` of the tensors and the rest of ``meta``."""
    meta = {k: v for k, v in meta.items() if k != CHECKSUM_KEY}
    meta[CHECKSUM_KEY] = model_checksum(tensors, meta)
    try:
        with replacing(path) as tmp:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    except SafetensorError as exc:  # the library's own I/O errors name no file: say which, and what
        text = str(exc)
        code = re.search(r"os error (\d+)|code: (\d+)", text)
        what = os.strerror(int(code.group(1) or code.group(2))).lower() if code else text
        raise OutputError(f"{path}: could not write the model file: {what}") from exc


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and metadata; any problem raises ModelFileError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: model file is empty (0 bytes)")
    meta = read_metadata(path)
    try:
        tensors = _read_tensors(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path}: model file is truncated or corrupt ({exc}); re-create it with `defectscope fit`"
        ) from exc
    stored = meta.get(CHECKSUM_KEY)
    if stored is None:  # files from before checksums: nothing to verify against, so say so
        log.warning(
            "%s: has no checksum (written before defectscope checked its model files): a damaged or "
            "hand-edited file cannot be told from a good one; `defectscope calibrate` or a new fit writes one",
            path,
        )
    if stored is not None and model_checksum(tensors, meta) != stored:
        raise ModelFileError(
            f"{path}: model file is damaged or was edited: its content does not match the checksum written with "
            "it (a copy error, a failing disk, or a hand edit of its header); restore it from a backup, re-create "
            "it with `defectscope fit`, or change its threshold with `defectscope calibrate`"
        )
    return tensors, meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, read into memory. Not memory-mapped: a mapped file that is overwritten in
    place (``cp new.dsmodel served.dsmodel``) would kill a process still using the model with SIGBUS."""
    try:
        return load_file(str(path), backend="pread")
    except TypeError:  # safetensors before the backend argument
        return load(path.read_bytes())


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a model file, validated (format name and version)."""
    path = Path(path)
    raw = _header_metadata(path)
    if raw is None or _META_KEY not in raw:
        raise ModelFileError(f"{path}: not a defectscope model file (no defectscope metadata)")
    try:
        meta = json.loads(raw[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: model metadata is not valid JSON ({exc})") from exc
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: not a defectscope model file (format {meta.get('format')!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{path}: not a defectscope model file (format version {version!r})")
    if version > FORMAT_VERSION:
        raise ModelFileError(_upgrade_message(path, meta))
    return meta


def _release(version: object) -> tuple[int, ...] | None:
    """``"0.2.0"`` -> (0, 2, 0); None when ``version`` is not a release number."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version) if isinstance(version, str) else None
    return tuple(int(g or 0) for g in match.groups()) if match else None


def written_by_newer(meta: dict[str, Any]) -> bool:
    """Whether the model file's metadata says a newer defectscope wrote it."""
    theirs, ours = _release(meta.get("package_version")), _release(__version__)
    return theirs is not None and ours is not None and theirs > ours


def _upgrade_message(path: str | Path, meta: dict[str, Any]) -> str:
    made_by = meta.get("package_version") or "an unknown version"
    return (
        f"{path}: made by defectscope {made_by} (format {meta.get('format_version')}); this is "
        f"{__version__} (format {FORMAT_VERSION}): upgrade: install defectscope {made_by} or later to read it"
    )


def is_model_file(path: str | Path) -> bool:
    """Whether ``path`` is a defectscope model file, of any format version (never raises)."""
    try:
        raw = _header_metadata(Path(path))
        meta = json.loads(raw[_META_KEY]) if raw is not None and _META_KEY in raw else None
    except (DefectscopeError, OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


#: the model file as an output kind (:func:`defectscope.common.files.check_output_file`)
MODEL_FILE = FileKind("defectscope model", "model.dsmodel", is_model_file)


def _header_metadata(path: Path) -> dict[str, str] | None:
    """Parse the safetensors header (8-byte little-endian length + JSON) without reading tensors."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: not a defectscope model file (too short to be safetensors)")
            n = int.from_bytes(head, "little")
            size = path.stat().st_size
            if n <= 0 or n > min(size - 8, 100 * 2**20):
                raise ModelFileError(f"{path}: not a defectscope model file (no safetensors header)")
            header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not a defectscope model file (unreadable header)") from exc
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read model file ({exc.strerror})") from exc
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a defectscope model file (unexpected header)")
    meta = header.get("__metadata__")
    return meta if isinstance(meta, dict) else None


def load_model(path: str | Path) -> tuple[Detector, dict[str, Any]]:
    """Rebuild the detector saved in ``path``; returns (fitted detector, metadata)."""
    detector, meta, _ = load_model_with_extras(path)
    return detector, meta


def load_model_with_extras(path: str | Path) -> tuple[Detector, dict[str, Any], dict[str, torch.Tensor]]:
    """Like :func:`load_model`, plus the extra tensors (names starting with :data:`EXTRA_PREFIXES`); the
    region of interest, if any, is already set on the detector."""
    tensors, meta = read_model_file(path)
    extras = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(EXTRA_PREFIXES)]}
    try:
        params = dict(meta["params"])
        # files written before the normalization parameter existed used the weights' own statistics
        params.setdefault("normalization", LEGACY_NORMALIZATION)
        if meta["method"] == "spade":  # files from before global_layer pooled the deepest map layer
            params.setdefault("global_layer", "maps")
        # parameters added since (rotations, layer_weighting, ...): the value that computes as files did before
        taken = detector_class(meta["method"])._param_names()
        for name, value in NEUTRAL_PARAMS.items():
            if name in taken:
                params.setdefault(name, value)
        if meta["method"] == "patchcore" and "coreset" not in params:
            # files written before the fold selection: one greedy over all (or a random subset of the)
            # patches, no bank cap; coreset_candidates was retired with it
            params.pop("coreset_candidates", None)
            params.update(coreset="exact", max_bank_size=None)
        detector = make_detector(meta["method"], **params)
        detector.load_state(tensors)
        if ROI_TENSOR in extras:
            detector.set_roi(extras[ROI_TENSOR])
    except DefectscopeError as exc:  # a parameter or method this version does not know
        if written_by_newer(meta):
            raise ModelFileError(_upgrade_message(path, meta)) from exc
        raise
    except KeyError as exc:
        raise ModelFileError(f"{path}: model file is missing {exc}; re-create it with `defectscope fit`") from exc
    return detector, meta, extras


def update_metadata(path: str | Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a model file with ``changes`` merged into its metadata (atomic)."""
    tensors, meta = read_model_file(path)
    meta.update(changes)
    write_model_file(Path(path), tensors, meta)
    return meta
