"""Deformable DETR's feature pyramid: backbone maps -> `levels` maps of the transformer's width, finest first.

Each backbone level gets a 1x1 convolution and GroupNorm(32); levels beyond the backbone's three (strides 8/16/32)
are stride-2 3x3 convolutions (+ GroupNorm), the first on the last backbone map, each next one on the previous
level. Used by Deformable DETR and by Conditional DETR with more than one level.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def join_levels(maps: list[Tensor], dim: int) -> Tensor:
    """Per-level tensors concatenated along `dim`; one level is returned as it is (a one-level model pays no
    copy)."""
    return maps[0] if len(maps) == 1 else torch.cat(maps, dim)


class LevelProjections(nn.ModuleList):
    """Entry j is Sequential(conv, GroupNorm): state_dict keys `j.0.weight`, as transformers' `input_proj`."""

    def __init__(self, channels: list[int], dim: int, levels: int):
        # dim % 32 == 0 (GroupNorm(32)) is checked by ModelConfig, with the family and level count named
        projections = [nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(32, dim)) for c in channels]
        in_channels = channels[-1]
        for _ in range(levels - len(channels)):
            extra = nn.Conv2d(in_channels, dim, 3, stride=2, padding=1)
            projections.append(nn.Sequential(extra, nn.GroupNorm(32, dim)))
            in_channels = dim
        super().__init__(projections)

    def reset_parameters(self) -> None:
        """The official Deformable DETR initialisation (the owning model calls it, in its own order)."""
        for proj in self:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

    def forward(self, backbone_out: list[tuple[Tensor, Tensor]],
                padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """backbone_out [(features [B, C_j, H_j, W_j], mask [B, H_j, W_j])], padding_mask [B, H, W] (True =
        padding) -> maps [B, d, H_j, W_j] and masks [B, H_j, W_j] for every level, finest first."""
        features = [proj(f) for proj, (f, _) in zip(self, backbone_out)]
        masks = [m for _, m in backbone_out]
        for j in range(len(backbone_out), len(self)):
            src = backbone_out[-1][0] if j == len(backbone_out) else features[-1]
            features.append(self[j](src))
            masks.append(F.interpolate(padding_mask[None].float(), size=features[-1].shape[-2:])[0].bool())
        return features, masks
