"""A traced (TorchScript) copy of a model's feature extractor, cached on disk, so scoring starts without timm.

Building an extractor imports timm (which imports torchvision and much of torch's compiler stack: about
1.5-2 s on two cores) and then constructs the network and loads its weights; a script that calls
``defectscope predict`` once per image pays that every time. :func:`use_cached_extractor` gives a loaded
model the traced copy of its extractor when one is cached, and otherwise builds the extractor as usual and
caches its trace for the next process.

Safety: the cache key is the sha256 of the backbone, the layers, the ``weights`` parameter, the weights
record the model file carries (file sha256 of packaged or local weights), the normalisation, the input
shape, and the torch, timm and defectscope versions. A trace is written only when the freshly built
extractor's weights record equals the model file's (so a cache entry never stands for other weights), and
only when the traced copy reproduces the built extractor exactly on a random batch of two (a trace that
baked in a batch size or a branch is not kept). Files are written atomically under
``$DEFECTSCOPE_CACHE/extractors/``; an unreadable entry is rebuilt. ``DEFECTSCOPE_NO_TRACE_CACHE=1``
turns the cache off.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.geometry import input_shape
from ..version import __version__

log = logging.getLogger(__name__)

DISABLE_ENV = "DEFECTSCOPE_NO_TRACE_CACHE"
_ATTRIBUTES = ("layers", "channels", "strides", "mean", "std", "weights_info")


class TracedExtractor(nn.Module):
    """The extractor contract (``layers``, ``channels``, ``strides``, ``mean``, ``std``, ``weights_info``;
    forward: (B, 3, H_in, W_in) -> list of (B, C_l, H_l, W_l)) over a TorchScript module."""

    def __init__(self, module: torch.jit.ScriptModule, attributes: dict[str, Any]) -> None:
        super().__init__()
        self.module = module
        self.layers = tuple(attributes["layers"])
        self.channels = tuple(attributes["channels"])
        self.strides = tuple(attributes["strides"])
        self.mean = tuple(attributes["mean"])
        self.std = tuple(attributes["std"])
        self.weights_info = attributes["weights_info"]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.module(x))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _identity(info: Any) -> Any:
    """A weights record without where its converted copy happens to be cached (``cache``): what the weights are
    (source, package, file, sha256), not where this machine keeps them."""
    if isinstance(info, dict):
        return {k: _identity(v) for k, v in info.items() if k != "cache"}
    if isinstance(info, list):
        return [_identity(v) for v in info]
    return info


def cache_key(detector: Any, recorded_weights: Any) -> str:
    """sha256 (hex) of everything the traced extractor depends on (see the module docstring)."""
    spec = {
        "backbone": detector.backbone,
        "layers": list(detector.layers or []),
        "weights": detector.weights,
        "recorded": _identity(recorded_weights),
        "normalization": detector.normalization,
        "input": list(input_shape(detector.image_size)),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "defectscope": __version__,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _folder() -> Path:
    from .weights import cache_dir

    return cache_dir() / "extractors"


def use_cached_extractor(detector: Any, recorded_weights: Any) -> str:
    """Give ``detector`` (loaded from a model file whose weights record is ``recorded_weights``) its
    traced extractor: from the cache when there, else built as usual and traced into the cache.

    Returns what happened: "cached", "traced" (built, and its trace saved), "built" (built; not cached:
    disabled, no weights record, other weights than recorded, a trace that differs, or an unwritable cache).
    Never raises for a cache problem: the detector then builds its extractor itself.
    """
    if os.environ.get(DISABLE_ENV) or not recorded_weights or detector.layers is None:
        return "built"
    key = cache_key(detector, recorded_weights)
    folder = _folder()
    module_path, meta_path = folder / f"{key}.pt", folder / f"{key}.json"
    if module_path.is_file() and meta_path.is_file():
        try:
            attributes = json.loads(meta_path.read_text())
            with warnings.catch_warnings():  # TorchScript's deprecation notice: it still loads what it saved
                warnings.simplefilter("ignore", FutureWarning)
                traced = TracedExtractor(torch.jit.load(str(module_path), map_location="cpu"), attributes)
            detector.set_extractor(traced)
            return "cached"
        except Exception as exc:
            log.info("traced extractor %s unreadable (%s): building it again", module_path, exc)
    built = detector.extractor
    if _identity(json.loads(json.dumps(built.weights_info, default=str))) != _identity(recorded_weights):
        log.info("the backbone's weights differ from the ones the model file records: extractor not cached")
        return "built"
    try:
        traced = _trace(built, input_shape(detector.image_size))  # the backbone sees tiles, not canvases
        if traced is None:
            return "built"
        from ..common.files import replacing

        folder.mkdir(parents=True, exist_ok=True)
        with replacing(module_path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(traced, str(tmp))
        attributes = {name: getattr(built, name) for name in _ATTRIBUTES}
        with replacing(meta_path) as tmp:
            tmp.write_text(json.dumps(attributes, default=str))
    except Exception as exc:
        log.info("could not cache the traced extractor under %s: %s", folder, exc)
        return "built"
    return "traced"


def _trace(extractor: nn.Module, shape: tuple[int, int]) -> torch.jit.ScriptModule | None:
    """TorchScript trace of ``extractor`` at input ``shape``; None unless it reproduces the extractor exactly
    on a random batch of two (traced at batch one)."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, *shape, generator=generator)
    probe = torch.randn(2, 3, *shape, generator=generator)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notices; checked below instead
        traced = torch.jit.trace(extractor, example, strict=False, check_trace=False)
        expected = extractor(probe)
        got = list(traced(probe))
    if len(got) != len(expected) or any(not torch.equal(a, b) for a, b in zip(got, expected)):
        log.info("traced extractor differs from the built one: not cached")
        return None
    return traced
