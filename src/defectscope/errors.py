"""Exceptions that carry a message a user can act on."""

from __future__ import annotations


class DefectscopeError(Exception):
    """Base class for every error defectscope reports to a user (one line, actionable)."""


class NotFittedError(DefectscopeError):
    """A detector was asked to predict or save before ``fit`` was called."""


class ImageLoadError(DefectscopeError):
    """An image file is missing, empty, corrupt, or not an image. The message names the file."""


class ModelFileError(DefectscopeError):
    """A model file is missing, truncated, foreign, or from an incompatible format version."""


class BackboneError(DefectscopeError):
    """An unknown backbone or layer, or weights that cannot be found or loaded."""


class DataLayoutError(DefectscopeError):
    """A dataset folder does not have the expected layout, or has too few images."""
