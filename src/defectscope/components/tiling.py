"""Tiling: an N x N grid of overlapping tiles cut from a larger model input, and maps stitched back.

For high-resolution photos with small defects: instead of shrinking the whole photo to the
backbone's input size, the photo is resized to a larger *canvas* and cut into N x N tiles of the
input size, each scored on its own; the tiles' anomaly maps are put back where they came from and
averaged where tiles overlap (the scheme of anomalib's ``Tiler``, which we follow in idea: tile
size, stride, averaging of overlaps).

Geometry: tiles of (t_h, t_w) pixels, stride s = round(t x (1 - overlap)) per side (at least 1),
canvas = t + (N - 1) x s per side; tile (i, j) starts at (i x s_h, j x s_w). With N = 1 the
canvas is the tile and both functions are the identity.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..errors import DefectscopeError

__all__ = ["MAX_TILES", "TileGrid", "tile_grid"]

#: most tiles per side
MAX_TILES = 8


@dataclass(frozen=True)
class TileGrid:
    """N x N tiles of ``tile`` = (t_h, t_w) pixels, ``stride`` = (s_h, s_w) apart."""

    tile: tuple[int, int]
    n: int
    stride: tuple[int, int]

    @property
    def count(self) -> int:
        """T = N^2 tiles per image."""
        return self.n * self.n

    @property
    def canvas(self) -> tuple[int, int]:
        """(H, W) of the image the tiles are cut from."""
        return (self.tile[0] + (self.n - 1) * self.stride[0], self.tile[1] + (self.n - 1) * self.stride[1])

    def origins(self) -> list[tuple[int, int]]:
        """Top-left (y, x) of every tile, row by row."""
        return [(i * self.stride[0], j * self.stride[1]) for i in range(self.n) for j in range(self.n)]

    def split(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) canvases -> (B x T, C, t_h, t_w) tiles; image b's tiles are rows b*T .. b*T+T-1.
        With N = 1 the images themselves, of any size.

        Raises:
            DefectscopeError: N > 1 and the images are not canvas-sized.
        """
        if self.n == 1:  # no tiling: whatever the detector is given (tune's cached-feature tokens too)
            return images
        if tuple(images.shape[-2:]) != self.canvas:
            raise DefectscopeError(
                f"tiling expects {self.canvas[0]}x{self.canvas[1]} inputs, got {images.shape[-2]}x{images.shape[-1]}"
            )
        th, tw = self.tile
        tiles = [images[:, :, y : y + th, x : x + tw] for y, x in self.origins()]
        return torch.stack(tiles, dim=1).reshape(-1, images.shape[1], th, tw)

    def stitch(self, maps: torch.Tensor) -> torch.Tensor:
        """(B x T, t_h, t_w) tile maps -> (B, H, W) canvas maps, overlaps averaged.

        Raises:
            DefectscopeError: the maps are not tile-sized or not a whole number of images.
        """
        if tuple(maps.shape[-2:]) != self.tile or maps.shape[0] % self.count:
            raise DefectscopeError(
                f"cannot stitch maps shaped {tuple(maps.shape)} from {self.count} tiles of "
                f"{self.tile[0]}x{self.tile[1]}"
            )
        if self.n == 1:
            return maps
        b = maps.shape[0] // self.count
        per_image = maps.reshape(b, self.count, *self.tile)
        total = maps.new_zeros((b, *self.canvas))
        cover = maps.new_zeros(self.canvas)
        th, tw = self.tile
        for t, (y, x) in enumerate(self.origins()):
            total[:, y : y + th, x : x + tw] += per_image[:, t]
            cover[y : y + th, x : x + tw] += 1
        return total / cover


def tile_grid(tile: tuple[int, int], n: int, overlap: float) -> TileGrid:
    """The grid of ``n`` x ``n`` tiles of ``tile`` pixels overlapping by the fraction ``overlap`` of a tile.

    Raises:
        DefectscopeError: ``n`` not an integer in [1, MAX_TILES] or ``overlap`` not in [0, 0.9].
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_TILES:
        raise DefectscopeError(f"tiles must be an integer between 1 and {MAX_TILES} (tiles per side), got {n!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0 <= overlap <= 0.9:
        raise DefectscopeError(f"tile_overlap must be a fraction of a tile between 0 and 0.9, got {overlap!r}")
    stride = (max(1, round(tile[0] * (1 - float(overlap)))), max(1, round(tile[1] * (1 - float(overlap)))))
    return TileGrid((int(tile[0]), int(tile[1])), int(n), stride)
