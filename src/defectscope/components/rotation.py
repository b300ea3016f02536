"""Turning preprocessed image tensors about their centre (rotation-augmented memory banks).

Angles are in degrees, counter-clockwise as displayed (the cv2 convention). Quarter turns of a
square image are exact (``torch.rot90``: pixels are moved, not resampled); any other angle
resamples bilinearly (``grid_sample``) with border padding: the corners the turn uncovers
repeat the nearest edge pixel, as alignment's warps do (BORDER_REPLICATE), instead of
inventing a black or mean-grey frame that no photo has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rotate_images", "rotation_angles"]


def rotation_angles(n: int) -> list[float]:
    """``n`` evenly spaced angles starting at 0: 0, 360/n, 2 x 360/n, ... (degrees)."""
    return [360.0 * k / n for k in range(n)]


def rotate_images(batch: torch.Tensor, degrees: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): every image turned by ``degrees`` about its centre.

    Angle 0 returns ``batch`` itself; quarter turns of square images use ``torch.rot90``.
    """
    turn = degrees % 360.0
    if turn == 0:
        return batch
    h, w = batch.shape[-2:]
    if h == w and turn % 90 == 0:
        return torch.rot90(batch, int(turn // 90), dims=(-2, -1)).contiguous()  # counter-clockwise as displayed
    # affine_grid maps each output pixel to the input point it samples (normalised coordinates, y down):
    # output(p) = input(R^-1 p), with R the counter-clockwise-as-displayed turn [[c, s], [-s, c]]
    # of y-down coordinates. Non-square images: scale the coordinates so the turn is rigid in pixels.
    rad = math.radians(turn)
    c, s = math.cos(rad), math.sin(rad)
    aspect = w / h
    theta = torch.tensor([[c, -s / aspect, 0.0], [s * aspect, c, 0.0]], dtype=batch.dtype)
    grid = F.affine_grid(theta.expand(batch.shape[0], 2, 3), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
