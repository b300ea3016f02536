"""Decode and preprocess images in background threads while the caller runs the model.

:func:`iter_batches` splits the paths into stretches of ``batch_size``; a producer thread
decodes each stretch (in a pool of ``workers`` threads when ``workers > 1``) and puts the
finished :class:`Batch` on a queue of at most ``prefetch`` batches, so memory stays bounded.
Batches come out in input order. Files that cannot be loaded are reported in the
``failures`` of their own stretch's batch and never stop the others. Original pixels are
not kept: callers that need them reload the file.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DefectscopeError, ImageLoadError
from .geometry import ImageSize, Placement, check_resize, input_shape, placement
from .images import load_image_noting, preprocess, to_rgb_uint8

if TYPE_CHECKING:  # torch loads on first use: exported models (a ``prepare`` hook) batch without it
    import torch

log = logging.getLogger(__name__)

_POLL_S = 0.05


@dataclass
class Batch:
    """One stretch of ``batch_size`` input paths, decoded.

    images:   (B, 3, H_in, W_in) float32 preprocessed images (B may be 0): a tensor, or a numpy array
              with a ``prepare`` hook.
    paths:    the B files that loaded, in input order.
    sizes:    original (H, W) of each, after EXIF orientation.
    failures: (path, one-line message) for files of this stretch that could not be loaded.
    transforms: what the ``transform`` hook returned for each loaded image (empty without one).
    notes:    per loaded image, what of the file was not used as it is (see ``load_image_noting``).
    placements: where each loaded image (after ``transform``) lies in the model input; its
              :meth:`~defectscope.data.geometry.Placement.to_photo_frame` takes a map back over it.
    """

    images: torch.Tensor | np.ndarray
    paths: list[Path]
    sizes: list[tuple[int, int]]
    failures: list[tuple[Path, str]] = field(default_factory=list)
    transforms: list[Any] = field(default_factory=list)
    notes: list[list[str]] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(eq=False)
class ArrayImage:
    """An in-memory image among the inputs: its name (for messages and results), the (H, W, 3)
    uint8 RGB array, or the one-line reason it could not be converted (then ``image`` is None).
    Compared by identity, so two equal arrays stay two inputs."""

    name: str
    image: np.ndarray | None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, obj: object, name: str) -> ArrayImage:
        """Convert a PIL image or numpy array (see :func:`defectscope.data.images.to_rgb_uint8`); a
        conversion problem is kept as ``error``, not raised; what was not used as given, as ``notes``."""
        notes: list[str] = []
        try:
            return cls(name, to_rgb_uint8(obj, name, notes), notes=notes)
        except ImageLoadError as exc:
            return cls(name, None, str(exc))

    def __str__(self) -> str:
        return self.name


#: one input of :func:`iter_batches`: an image file or an in-memory image
Source = Path | ArrayImage


@dataclass
class _Raised:
    """Carries an unexpected exception from the producer thread to the caller."""

    exc: BaseException


_DONE = object()


_Loaded = tuple[Any, tuple[int, int], Any, list[str], Placement]

#: per-image hook on the decoded (H, W, 3) uint8 image: returns (image to use, anything to keep)
ImageTransform = Callable[[np.ndarray], tuple[np.ndarray, Any]]
#: (H, W, 3) uint8 image, size, mean, std -> (3, S, S) float32 numpy model input, instead of preprocess
Prepare = Callable[[np.ndarray, int, Sequence[float], Sequence[float]], np.ndarray]


def _load_one(
    path: Source,
    size: ImageSize,
    mean: Sequence[float],
    std: Sequence[float],
    transform: ImageTransform | None = None,
    resize: str = "stretch",
    prepare: Prepare | None = None,
) -> _Loaded | str:
    """((3, H_in, W_in) tensor or array, original (H, W), transform record or None, notes, placement), or the
    ImageLoadError message."""
    if isinstance(path, ArrayImage):
        if path.image is None:
            return path.error or f"{path.name}: not an image"
        image, notes = path.image, list(path.notes)
    else:
        try:
            image, notes = load_image_noting(path)
        except ImageLoadError as exc:
            return str(exc)
    shape = (int(image.shape[0]), int(image.shape[1]))
    record = None
    if transform is not None:
        image, record = transform(image)
    place = placement(image.shape[:2], size, resize)
    model_input = prepare(image, size, mean, std) if prepare is not None else preprocess(image, size, mean, std, resize)
    return model_input, shape, record, notes, place


def _assemble(
    chunk: list[Path],
    results: list[_Loaded | str],
    size: ImageSize,
    transform_used: bool = False,
    as_numpy: bool = False,
) -> Batch:
    """A Batch from one stretch's load results (failures keep their input order)."""
    tensors, paths, sizes, failures, records, notes, places = [], [], [], [], [], [], []
    for path, result in zip(chunk, results):
        if isinstance(result, str):
            log.debug("could not load %s", result)
            failures.append((path, result))
        else:
            tensors.append(result[0])
            paths.append(path)
            sizes.append(result[1])
            records.append(result[2])
            notes.append(result[3])
            places.append(result[4])
    if as_numpy:
        images = np.stack(tensors) if tensors else np.empty((0, 3, *input_shape(size)), np.float32)
    else:
        import torch

        images = torch.stack(tensors) if tensors else torch.empty(0, 3, *input_shape(size))
    return Batch(
        images=images,
        paths=paths,
        sizes=sizes,
        failures=failures,
        transforms=records if transform_used else [],
        notes=notes,
        placements=places,
    )


def iter_batches(
    paths: Sequence[Source],
    size: ImageSize,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 16,
    workers: int = 1,
    prefetch: int = 2,
    transform: ImageTransform | None = None,
    resize: str = "stretch",
    prepare: Prepare | None = None,
) -> Iterator[Batch]:
    """Yield :class:`Batch` es of preprocessed images, decoded ahead in background thread(s).

    ``paths`` are image files or :class:`ArrayImage` s (in-memory images, used as given).
    Every stretch of ``batch_size`` paths gives one batch (possibly with B=0 images and
    only failures). Exceptions other than ImageLoadError are re-raised in the caller.
    Closing the generator early stops the background thread(s).

    transform: optional hook called on each decoded (H, W, 3) uint8 image before resizing
    (e.g. :class:`defectscope.components.align.Aligner`); it returns the image to use and a record that
    ends up in ``Batch.transforms`` (same order as ``Batch.paths``).

    size, resize: the model input, S or (H_in, W_in), and the resize protocol
    (:mod:`defectscope.data.geometry`).
    prepare: optional replacement for :func:`~defectscope.data.images.preprocess` returning numpy
    arrays (exported models: :func:`defectscope.export.preprocess.prepare`; stretch protocol only);
    ``Batch.images`` is then a numpy array and torch is not imported.
    """
    if batch_size < 1 or workers < 1 or prefetch < 1:
        raise DefectscopeError(
            f"batch_size, workers and prefetch must be at least 1, got {batch_size}, {workers}, {prefetch}"
        )
    input_shape(size)  # a bad size or protocol fails here, not in the producer thread
    check_resize(resize)
    if prepare is not None and resize != "stretch":
        raise DefectscopeError(f"a prepare hook resizes by stretching only, not with the {resize!r} protocol")
    paths = [p if isinstance(p, ArrayImage) else Path(p) for p in paths]
    mean, std = list(mean), list(std)
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Put ``item`` unless asked to stop; True if it went in."""
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="defectscope-decode") if workers > 1 else None
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                if pool is None:
                    results = []
                    for p in chunk:
                        if stop.is_set():
                            return
                        results.append(_load_one(p, size, mean, std, transform, resize, prepare))
                else:
                    results = list(pool.map(lambda p: _load_one(p, size, mean, std, transform, resize, prepare), chunk))
                if not put(_assemble(chunk, results, size, transform is not None, prepare is not None)):
                    return
            put(_DONE)
        except BaseException as exc:
            put(_Raised(exc))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    thread = threading.Thread(target=produce, name="defectscope-loader", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = out.get(timeout=_POLL_S)
            except queue.Empty:
                if not thread.is_alive() and out.empty():
                    raise DefectscopeError("image loader thread stopped unexpectedly") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then wait for it
            with contextlib.suppress(queue.Empty):
                out.get_nowait()
            thread.join(timeout=_POLL_S)
