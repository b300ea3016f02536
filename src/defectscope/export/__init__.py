"""Exported models: the whole scoring path as one ONNX or OpenVINO graph, run without torch.

``defectscope export MODEL --format onnx|openvino -o DIR`` (:func:`defectscope.export.exporter.export_model`,
needs torch and onnx) writes a folder; ``defectscope.load(DIR)`` runs it with onnxruntime or
OpenVINO (:mod:`defectscope.export.runtime`, no torch). The folder holds:

* ``model.onnx`` (``--format onnx``) or ``model.xml`` + ``model.bin`` (``--format openvino``): input
  ``images`` (N, 3, S, S) float32 in [0, 1], already resized to the model's S x S; outputs ``scores``
  (N,) and ``maps`` (N, S, S) (see :mod:`defectscope.export.graph`);
* ``defectscope-export.json``: the model file's metadata (threshold, pixel threshold, image size,
  normalisation, the model file's checksum, training summary) plus an ``export`` record: the graph
  files and their sha256, the runtime, the agreement with the torch model measured at export, and
  a checksum over the JSON itself.

This module imports nothing heavy (the command line reads it to build ``--help``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXPORT_FILE", "FORMATS", "INSTALL_HINT", "RUNTIMES", "RUNTIME_CHOICES", "is_exported", "set_threads"]

#: the metadata file that makes a folder an exported model
EXPORT_FILE = "defectscope-export.json"
FORMAT_NAME = "defectscope-export"
#: the newest export format this version reads; 2: the model is judged by a region rule (``judge``, applied
#: by :mod:`defectscope.scoring` on the maps the graph returns), which a reader of format 1 would ignore
FORMAT_VERSION = 2
#: what ``export --format`` writes
FORMATS: tuple[str, ...] = ("onnx", "openvino")
#: what runs an exported model; an ONNX export runs on either, an OpenVINO one on OpenVINO only
RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino")
#: what ``defectscope.load(runtime=...)`` and ``serve``/``batch --runtime`` accept ("auto": see
#: :func:`defectscope.api.choose_runtime`)
RUNTIME_CHOICES: tuple[str, ...] = ("auto", "torch", *RUNTIMES)
INSTALL_HINT = "pip install 'defectscope[export]'"

_threads: list[int | None] = [None]


def is_exported(path: str | Path | None) -> bool:
    """Whether ``path`` names a folder (an exported model, or meant as one) rather than a model file."""
    return path is not None and Path(path).is_dir()


def set_threads(n: int | None) -> None:
    """CPU threads the runtimes use from now on (None: every core this process may run on)."""
    _threads[0] = None if n is None else max(1, int(n))


def threads() -> int:
    """The runtimes' thread count (see :func:`set_threads`)."""
    import os

    if _threads[0] is not None:
        return _threads[0]
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
