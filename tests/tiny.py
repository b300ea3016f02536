"""A tiny fixed random CNN standing in for the backbone, and texture images, for fast detector tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 64  # -> 16 x 16 positions on the finest stand-in layer


class TinyExtractor(nn.Module):
    """Stand-in for backbones.FeatureExtractor: three fixed random conv layers (strides 4, 8, 16)."""

    def __init__(self, layers: list[str] | None = None, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, 8, 4, stride=4), nn.Conv2d(8, 12, 2, stride=2), nn.Conv2d(12, 16, 2, stride=2)]
        )
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / conv.weight[0].numel() ** 0.5)
                conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
        self.layers = ("l1", "l2", "l3")
        self.channels = (8, 12, 16)
        self.strides = (4, 8, 16)
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.25, 0.25, 0.25)
        self.weights_info = {"name": "tiny-test", "pretrained": False}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for conv in self.convs:
            x = torch.tanh(conv(x))
            out.append(x)
        return out


def textures(n: int, seed: int) -> torch.Tensor:
    """(n, 3, SIZE, SIZE) images of one texture distribution: smooth random field + noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 8, 8, generator=g)
    smooth = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 0.3 * smooth + 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
