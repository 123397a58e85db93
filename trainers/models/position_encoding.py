"""Sine positional encoding of a feature map, as in DETR (normalized coordinates, scale 2*pi)."""
import math

import torch
from torch import Tensor


def sine_position_encoding(mask: Tensor, dim: int, temperature: float = 10000.0, offset: float = 0.0) -> Tensor:
    """mask [B, H, W] bool (True = padding) -> [B, dim, H, W].

    Coordinates are cumulative counts over valid pixels, normalized to (0, 2*pi]. Deformable DETR shifts
    them by `offset=-0.5` (pixel centres); DETR and Conditional DETR use 0.
    """
    not_mask = (~mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = (y + offset) / (y[:, -1:, :] + eps) * scale
    x = (x + offset) / (x[:, :, -1:] + eps) * scale
    half = dim // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    pos_x = x[..., None] / dim_t  # [B, H, W, half]
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_box_encoding(coords: Tensor, dim_per_coord: int = 128, temperature: float = 10000.0) -> Tensor:
    """[..., k] coordinates in [0, 1] -> [..., k * dim_per_coord] sine encoding, coordinate order kept
    except that the first two are emitted as (y, x) like the map encoding (Conditional DETR's
    `gen_sineembed_for_position`)."""
    scale = 2 * math.pi
    dim_t = torch.arange(dim_per_coord, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / dim_per_coord)
    embeds = []
    for i in range(coords.shape[-1]):
        e = coords[..., i, None] * scale / dim_t
        embeds.append(torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2))
    if len(embeds) >= 2:
        embeds[0], embeds[1] = embeds[1], embeds[0]
    return torch.cat(embeds, dim=-1)
