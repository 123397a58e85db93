"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), in plain PyTorch.

Each query attends to a few sampled points around its reference point on every feature level, instead of to
every position: n_heads x n_levels x n_points bilinear samples, weighted by a softmax over all of them.
Sampling is one `grid_sample` per level (bilinear, zero padding, align_corners=False), as the official
PyTorch reference path; the weighted sum is done once over all levels.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.models.constants import cached_device_constant
from trainers.models.transformer_layers import linear_many


def ms_deform_attn_core(value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor,
                        attention_weights: Tensor) -> Tensor:
    """Weighted sum of bilinear samples of multi-level value maps.

    value               [B, S, M, D]  M heads of D channels; S = sum_l H_l * W_l, levels flattened in order
    spatial_shapes      [(H_l, W_l)] * L, python ints (no device sync)
    sampling_locations  [B, Q, M, L, P, 2]  normalized (x, y): 0 and 1 are the outer edges of the map, so
                        (x, y) reads pixel coordinates (x * W - 0.5, y * H - 0.5); outside the map reads zeros
    attention_weights   [B, Q, M, L, P]
    returns             [B, Q, M * D]
    """
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # grid_sample needs one dtype; under autocast value may be bf16 while locations stay fp32 (keep them precise)
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    value, grids = value.to(dtype), (2 * sampling_locations - 1).to(dtype)  # grid_sample's [-1, 1] frame
    # heads folded into the batch, levels first so that each level's grid is contiguous (grid_sample is
    # about 2x slower on a strided one): [L, B*M, Q, P, 2]
    grids = grids.permute(3, 0, 2, 1, 4, 5).reshape(L, B * M, Q, P, 2)
    sampled = []
    for grid, (h, w), v in zip(grids, spatial_shapes, value.split([h * w for h, w in spatial_shapes], dim=1)):
        v = v.permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*M, D, Q, P]
    sampled = torch.cat(sampled, dim=-1)  # [B*M, D, Q, L*P], level-major like the weights
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Q, L * P).to(dtype)
    out = (sampled * weights).sum(-1)  # [B*M, D, Q]
    return out.view(B, M * D, Q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Deformable attention of queries over a flattened multi-level map.

    Offsets and weights are predicted from the query alone (no keys); offsets are in pixels of each level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Initial offsets: head h looks along direction 2*pi*h/n_heads (scaled onto the unit square's border),
        # point p at distance p+1 pixels; uniform attention weights over all samples.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: list[tuple[int, int]],
                padding_mask: Tensor | None = None) -> Tensor:
        """query [B, Q, d] (positional embedding already added), reference_points [B, Q, L, 2] normalized (x, y)
        per level, value [B, S, d], spatial_shapes [(H_l, W_l)] * L, padding_mask [B, S] (True = padding)
        -> [B, Q, d]."""
        B, Q, _ = query.shape
        S = value.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)  # padding contributes nothing when sampled
        value = value.view(B, S, M, self.d_model // M)
        offsets, weights = linear_many(query, [self.sampling_offsets, self.attention_weights])
        offsets = offsets.view(B, Q, M, L, P, 2)
        weights = weights.reshape(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
        # offsets are in pixels of their level: divide by that level's (W, H)
        size = cached_device_constant(tuple((w, h) for h, w in spatial_shapes), reference_points)
        locations = reference_points[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_core(value, spatial_shapes, locations, weights).to(query.dtype))
