"""AdaMixer's decoder operators: adaptive 3D sampling and adaptive channel / spatial mixing.

A query's position is (x, y, z, r) in pixels of the padded canvas: centre (x, y), scale z = log2 sqrt(w h),
aspect r = log2(h / w). The feature pyramid is a 3D space whose depth axis is z: level j sits at
z_j = log2(stride_j). A sampling point (x, y, z) reads every level bilinearly at (x, y) and blends the levels
with Gaussian weights over z (a softmax of -(z - z_j)^2 / tau). Mixing weights are generated per query from
its content, so each query decodes its own sampled features with its own channel and spatial mixers.

Shapes: B images, N queries, G groups (channel groups of the features), P_in sampled points per group,
P_out mixed-out points per group, C features width, C_g = C / G.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.models.constants import cached_device_constant
from trainers.models.transformer_layers import LayerNorm, layer_norm, linear_many


def box_size(xyzr: Tensor) -> Tensor:
    """[..., 4] (x, y, z, r) -> [..., 2] (w, h) in pixels: w = 2^z 2^(-r/2), h = 2^z 2^(r/2)."""
    z, r = xyzr[..., 2:3], xyzr[..., 3:4]
    return torch.pow(2.0, torch.cat([z - 0.5 * r, z + 0.5 * r], -1))


def sampling_points(offsets: Tensor, xyzr: Tensor) -> Tensor:
    """offsets [B, N, K, 3] (dx, dy in box widths/heights, dz in log2 units), xyzr [B, N, 4]
    -> points [B, N, K, 3] (x, y in pixels, z): around the box centre, scaled by the box, at the box's depth."""
    xy = xyzr[:, :, None, :2] + offsets[..., :2] * box_size(xyzr)[:, :, None]
    z = xyzr[:, :, None, 2:3] + offsets[..., 2:3]
    return torch.cat([xy, z], -1)


def level_weights(z: Tensor, strides: list[int], tau: float = 2.0) -> Tensor:
    """z [...] (log2 pixels) -> [..., L] Gaussian weights over the levels' depths log2(stride), summing to 1."""
    depth = cached_device_constant(tuple(math.log2(s) for s in strides), z)
    return torch.softmax(-(z[..., None] - depth) ** 2 / tau, dim=-1)


def sample_3d(features: list[Tensor], strides: list[int], points: Tensor, groups: int) -> Tensor:
    """Adaptive 3D sampling.

    features: L maps [B, C, H_j, W_j] with strides s_j (cell (i, k) centred at ((k + .5) s_j, (i + .5) s_j));
    points [B, N, G * P, 3] (x, y in pixels, z), group-major: point p of group g is at index g * P + p.
    -> [B, N, G, P, C_g]: group g reads its own channels g*C_g:(g+1)*C_g, bilinearly, zero outside the map,
    summed over levels with level_weights(z).
    """
    B, N, K, _ = points.shape
    P = K // groups
    # one grid_sample per level over [B*G] channel-group "images", each with an [N, P] grid of points
    xy = points[..., :2].reshape(B, N, groups, P, 2).transpose(1, 2).flatten(0, 1)  # [B*G, N, P, 2]
    weights = level_weights(points[..., 2], strides).reshape(B, N, groups, P, -1)
    weights = weights.transpose(1, 2).flatten(0, 1)  # [B*G, N, P, L]
    extents = cached_device_constant(tuple((f.shape[-1] * s, f.shape[-2] * s) for f, s in zip(features, strides)),
                                     xy)  # [L, 2]
    out = None
    for j, feature in enumerate(features):
        C, H, W = feature.shape[1:]
        grid = xy / extents[j] * 2 - 1  # align_corners=False: -1 / +1 are the map's outer edges
        # sample in the wider dtype: a bf16 grid would place points only to ~1/256 of the map's width
        dtype = torch.promote_types(feature.dtype, grid.dtype)
        value = feature.reshape(B * groups, C // groups, H, W).to(dtype)
        grid = grid.to(dtype)
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled * weights[..., j].unsqueeze(1).to(sampled.dtype)  # [B*G, C_g, N, P]
        out = sampled if out is None else out + sampled
    return out.reshape(B, groups, -1, N, P).permute(0, 3, 1, 4, 2)  # [B, N, G, P, C_g]


def channel_mixing(x: Tensor, weight: Tensor, bf16_norm: bool = False) -> Tensor:
    """x [..., P, C_in], weight [..., C_in, C_out] -> ReLU(LayerNorm(x @ weight)) [..., P, C_out], the norm
    over each query-group's whole (P, C_out) block, without affine parameters (as the official); bf16_norm:
    see transformer_layers.layer_norm."""
    out = torch.matmul(x, weight)
    return F.relu(layer_norm(out, out.shape[-2:], bf16_output=bf16_norm))


def spatial_mixing(x: Tensor, weight: Tensor, bf16_norm: bool = False) -> Tensor:
    """x [..., P_in, C], weight [..., P_out, P_in] -> ReLU(LayerNorm(weight @ x)) [..., P_out, C]."""
    out = torch.matmul(weight, x)
    return F.relu(layer_norm(out, out.shape[-2:], bf16_output=bf16_norm))


class AdaptiveSamplingMixing(nn.Module):
    """A query's content generates sampling offsets around its box and the weights of its two mixers; the
    mixed points are flattened, projected back to d and added to the content (residual, then LayerNorm)."""

    def __init__(self, dim: int, groups: int = 4, in_points: int = 32, out_points: int = 128):
        super().__init__()
        if dim % groups:
            raise ValueError(f"adamixer needs hidden_dim {dim} divisible by its {groups} mixing groups")
        self.groups, self.in_points, self.out_points = groups, in_points, out_points
        self.group_dim = c = dim // groups
        # named *generator*, not sampling_offsets: the engine's lr x0.1 rule is Deformable DETR's, not AdaMixer's
        self.offset_generator = nn.Linear(dim, groups * in_points * 3)
        self.mixing_generator = nn.Linear(dim, groups * (c * c + out_points * in_points))
        self.out_proj = nn.Linear(groups * out_points * c, dim)
        self.norm = LayerNorm(dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation (after xavier on every matrix): offsets start content-independent,
        spread over the box (a regular grid when P_in is a square, else uniform in [-0.5, 0.5]) one level
        below the box's own depth; mixing weights start content-independent (the generator's bias)."""
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.offset_generator.weight)
        bias = self.offset_generator.bias.view(self.groups, self.in_points, 3)
        side = math.isqrt(self.in_points)
        if side * side == self.in_points:
            centres = (torch.arange(side, dtype=bias.dtype) + 0.5) / side - 0.5
            gy, gx = torch.meshgrid(centres, centres, indexing="ij")
            bias[..., :2] = torch.stack([gx.flatten(), gy.flatten()], -1)
        else:
            nn.init.uniform_(bias[..., :2], -0.5, 0.5)
        bias[..., 2] = -1.0
        nn.init.zeros_(self.mixing_generator.weight)

    def forward(self, content: Tensor, xyzr: Tensor, features: list[Tensor], strides: list[int]) -> Tensor:
        """content [B, N, d], xyzr [B, N, 4] (pixels), features L maps [B, d, H_j, W_j] -> [B, N, d]."""
        B, N, _ = content.shape
        G, P, Q, c = self.groups, self.in_points, self.out_points, self.group_dim
        offsets, params = linear_many(content, [self.offset_generator, self.mixing_generator])
        offsets = offsets.reshape(B, N, G * P, 3)
        sampled = sample_3d(features, strides, sampling_points(offsets, xyzr), G)  # [B, N, G, P, c]
        params = params.reshape(B, N, G, c * c + Q * P)
        channel_w, spatial_w = params.split([c * c, Q * P], -1)
        bf16_norm = self.norm.bf16_output  # the mixers' norms follow the module's own
        x = channel_mixing(sampled.to(channel_w.dtype), channel_w.reshape(B, N, G, c, c), bf16_norm)
        x = spatial_mixing(x, spatial_w.reshape(B, N, G, Q, P), bf16_norm)  # [B, N, G, Q, c]
        return self.norm(content + self.out_proj(x.flatten(2)))
