"""Measuring and setting a model: the field's metrics and the operating point.

:mod:`.metrics` (image/pixel AUROC, AUPRO, F1-max, pure numpy), :mod:`.evaluate` (a model on a
labelled test split), :mod:`.calibration` (thresholds from labelled images), :mod:`.tune`
(choosing layers on a validation split with the backbone run once per image).
"""
