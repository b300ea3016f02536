"""defectscope: unsupervised visual inspection with SPADE, PaDiM and PatchCore.

The Python API (see :mod:`defectscope.api`)::

    import defectscope
    model = defectscope.load("part.dsmodel")
    result = model.predict("photo.png")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["Model", "Result", "__version__", "fit", "load"]

if TYPE_CHECKING:
    from .api import Model, Result, fit, load


def __getattr__(name: str) -> Any:
    """The API's names load on first use, so ``import defectscope`` (and the command line's
    ``--help``) stays instant."""
    if name in ("Model", "Result", "fit", "load"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'defectscope' has no attribute {name!r}")
