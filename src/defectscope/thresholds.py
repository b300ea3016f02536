"""Named thresholds: one active image threshold plus named alternatives, each with its evidence.

A model file's metadata holds

* ``threshold``: the **active** threshold, what every front end judges with unless told otherwise
  (a score at or above it is judged defective);
* ``active_threshold``: the name of the active threshold;
* ``thresholds``: ``{name: entry}``, every threshold the model was fitted or calibrated with.

An entry (JSON)::

    {"value": 8.51,                              # the threshold (the model's score scale)
     "rule": "catch >= 0.95",                    # what it was chosen for, in words
     "counts": {"n_good": 26, "n_defective": 141, "n_failed": 0},
     "rates": {"false_reject": {"count", "n", "rate", "ci"},   # on the images it was chosen on,
               "catch": {"count", "n", "rate", "ci"}},         # ci: 95 % Clopper-Pearson [low, high]
     "data": "path/to/validation", "source": "the labelled folder ...",
     "date": "2026-12-08T10:00:00+00:00",
     "previous": {"name": "fit", "value": 10.2},  # the active threshold when it was made
     "warning": "..."}                            # only when the images are too few for the rule

The fit-time threshold is the entry ``"fit"`` (the 0.99 quantile of held-out training scores
by default; ``rates`` is None: the held-out scores are not kept). Model files written before names
existed have no ``thresholds``: :func:`named_thresholds` reads the same view from their
``threshold_info`` and ``threshold_history`` without changing the file, and the first
``calibrate`` writes it.

This module is pure (dicts in, dicts out); :mod:`defectscope.evaluation.calibration` writes entries,
:class:`defectscope.api.Model` reads them.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import DefectscopeError

#: the name of the fit-time threshold
FIT_NAME = "fit"
#: threshold names: what fits in a URL query and a file name without escaping
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class UnknownThresholdError(DefectscopeError):
    """A threshold name the model does not have; the message lists the names it has."""


def check_name(name: str) -> str:
    """``name`` if it is a valid threshold name, else DefectscopeError saying what is allowed."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise DefectscopeError(
            f"threshold name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. strict, lenient, catch-0.95)"
        )
    return name


def _number(value: float) -> str:
    """0.95 -> "0.95", 20.0 -> "20", 1e-3 -> "0.001": short, exact enough for a name."""
    return f"{value:.6g}"


def natural_name(info: dict[str, Any]) -> str:
    """The default name of a calibration result (a :func:`~defectscope.evaluation.calibration.calibrate_threshold`
    dict): ``catch-0.95``, ``false-reject-0.01``, ``cost-20`` (miss cost / reject cost) or ``f1``."""
    if "target_catch" in info:
        return f"catch-{_number(info['target_catch'])}"
    if "target_fpr" in info:
        return f"false-reject-{_number(info['target_fpr'])}"
    if "cost_miss" in info:
        return f"cost-{_number(info['cost_miss'] / info['cost_reject'])}"
    if "f1" in info:
        return "f1"
    if "quantile" in info:
        return FIT_NAME
    return "calibrated"


def fit_entry(info: dict[str, Any] | None, threshold: float, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``"fit"`` entry from fit-time ``threshold_info`` (:func:`defectscope.fitting.threshold_from_scores`)."""
    info = info or {}
    training = training or {}
    quantile = info.get("quantile")
    entry: dict[str, Any] = {
        "value": float(threshold),
        "rule": (
            f"quantile {quantile:g} of held-out scores of the good training images"
            if isinstance(quantile, (int, float))
            else str(info.get("rule", "fit-time threshold"))
        ),
        "counts": {"n_good": info.get("n_images", training.get("n_images")), "n_defective": 0},
        "rates": None,
        "data": training.get("data"),
        "date": training.get("created"),
        "previous": None,
    }
    if "warning" in info:
        entry["warning"] = info["warning"]
    return entry


def calibration_entry(info: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """The entry of a calibration result ``info`` (see :mod:`defectscope.evaluation.calibration`)."""
    entry: dict[str, Any] = {
        "value": float(info["threshold"]),
        "rule": info.get("rule_short", info.get("rule")),
        "counts": {
            "n_good": info.get("n_good"),
            "n_defective": info.get("n_defective"),
            "n_failed": info.get("n_failed", 0),
        },
        "rates": info.get("rates"),
        "data": info.get("data"),
        "source": info.get("source"),
        "date": info.get("calibrated"),
        "previous": previous,
    }
    for key in ("target_catch", "target_fpr", "cost_miss", "cost_reject", "f1", "warning"):
        if key in info:
            entry[key] = info[key]
    return entry


def _legacy_entry(
    info: dict[str, Any] | None, threshold: float, training: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(name, entry) of a threshold recorded before names existed (its ``threshold_info``)."""
    info = info or {}
    name = natural_name(info)
    if name == FIT_NAME or not info:
        return FIT_NAME, fit_entry(info, threshold, training)
    return name, calibration_entry({**info, "threshold": threshold}, None)


def named_thresholds(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The model's named thresholds, ``{name: entry}``, ``"fit"`` first, then oldest first (a view: do not
    change it; the active one included).

    Files written before names existed get theirs from ``threshold_history`` (oldest first) and
    ``threshold_info`` (the active one): the fit-time threshold as ``"fit"``, each calibration under
    its natural name (a later one of the same name wins)."""
    stored = meta.get("thresholds")
    if isinstance(stored, dict) and stored:  # the file keeps JSON keys sorted: list "fit" first, then by date
        return dict(sorted(stored.items(), key=lambda item: (item[0] != FIT_NAME, str(item[1].get("date") or ""))))
    training = meta.get("training") or {}
    found: dict[str, dict[str, Any]] = {}
    for old in meta.get("threshold_history") or []:
        if isinstance(old, dict) and "threshold" in old:
            name, entry = _legacy_entry(old.get("threshold_info"), float(old["threshold"]), training)
            found[name] = entry
    if "threshold" in meta:
        name, entry = _legacy_entry(meta.get("threshold_info"), float(meta["threshold"]), training)
        found[name] = entry
    return found


def active_name(meta: dict[str, Any]) -> str | None:
    """The name of the active threshold (``meta["threshold"]``); None when the threshold was set some
    other way (``meta["threshold"]`` edited through the API: it no longer equals its named entry)."""
    if "threshold" not in meta:
        return None
    value = float(meta["threshold"])
    named = named_thresholds(meta)
    stored = meta.get("active_threshold")
    if "thresholds" not in meta:  # a file from before names: the active one is read from threshold_info
        stored, _ = _legacy_entry(meta.get("threshold_info"), value, {})
    if isinstance(stored, str) and stored in named and float(named[stored]["value"]) == value:
        return stored
    return None


def describe(meta: dict[str, Any]) -> str:
    """``fit (10.2, active), catch-0.95 (8.51)``: the names, values and which is active."""
    named = named_thresholds(meta)
    active = active_name(meta)
    if not named:
        return "none"
    return ", ".join(
        f"{name} ({float(entry['value']):.6g}{', active' if name == active else ''})" for name, entry in named.items()
    )


def resolve(meta: dict[str, Any], name: str, where: str = "the model") -> float:
    """The value of the threshold named ``name``; UnknownThresholdError listing the names there are."""
    named = named_thresholds(meta)
    if name not in named:
        raise UnknownThresholdError(
            f"{where} has no threshold named {name!r}; it has: {describe(meta)}. "
            f"Use one of those, or add it with `defectscope calibrate MODEL DATA ... --name {name}`"
        )
    return float(named[name]["value"])


def with_threshold(meta: dict[str, Any], name: str, entry: dict[str, Any], *, activate: bool) -> dict[str, Any]:
    """The metadata changes that store ``entry`` under ``name`` (replacing an entry of that name) and,
    with ``activate``, make it the active threshold (the one it replaces goes to ``threshold_history``,
    as before names). The fit-time entry of an older file is kept: nothing is lost."""
    check_name(name)
    named = dict(named_thresholds(meta))
    named[name] = entry
    changes: dict[str, Any] = {"thresholds": named}
    if activate:
        history = list(meta.get("threshold_history") or [])
        history.append(
            {
                "threshold": meta.get("threshold"),
                "threshold_info": meta.get("threshold_info"),
                "replaced": entry["date"],
            }
        )
        changes.update(threshold=entry["value"], active_threshold=name, threshold_history=history)
    else:
        changes["active_threshold"] = active_name(meta)
    return changes
