"""JSON that every reader accepts: no NaN or Infinity, which ``json.dumps`` writes by default."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "finite"]


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, recursively (dicts, lists, tuples),
    and every string that holds undecodable file-name bytes (lone surrogates, as ``os.fsdecode`` keeps them)
    written with those bytes as ``\\xNN`` escapes, so strict JSON readers accept it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            return obj.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(obj, dict):
        return {finite(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return finite(obj.item())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite` (obj); raises ValueError rather than ever writing NaN."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
