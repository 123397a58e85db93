"""AdaMixer (Gao et al., CVPR 2022): a query-based detector with no transformer encoder.

Backbone maps (strides 8/16/32, or 4/8/16/32 with finest_stride 4 as the official C2-C5, plus stride-2 convs
for extra levels) are projected to d channels and normalised (the features that enter the decoder). Each
query is a content vector and a position (x, y, z, r) in pixels: box centre, log2 scale sqrt(w h), log2
aspect h / w. Every decoder stage:
  self-attention among queries (input: content + sine encoding of the position; bias: log IoF of the boxes,
  times a learned per-head temperature) -> adaptive 3D sampling around the box, across levels by z ->
  adaptive channel and spatial mixing with weights generated from the content -> FFN ->
  its own class and box heads; the box head refines the position: xy += dxy 2^z, zr += dzr.
The position is detached between stages (as the official), so a stage's box loss trains that stage only.
Initial queries: learned content (LayerNorm-ed before the first stage) and learned boxes, normalized cxcywh,
initialised to the whole image.

Boxes out are normalized cxcywh of the image (not the padded canvas); like the official, they are not
clipped, so a box may extend past the image edge.

Shapes: B images, N queries, C classes, d hidden size, h heads, L stages.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.config import ModelConfig
from trainers.models.adamixer_ops import AdaptiveSamplingMixing, box_size
from trainers.models.backbone import Backbone
from trainers.models.constants import cached_device_constant
from trainers.models.output import DecoderPredictions, DetectorOutput, QueryGroup, cross_group_mask
from trainers.models.transformer_layers import LayerNorm


def image_sizes(mask: Tensor) -> Tensor:
    """mask [B, H, W] (True = padding, at the bottom and right) -> [B, 2] (w, h) of each image in pixels."""
    return torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1).float()


def boxes_to_xyzr(boxes: Tensor, img_wh: Tensor) -> Tensor:
    """boxes [B, N, 4] normalized cxcywh, img_wh [B, 2] -> [B, N, 4] (x, y, z, r) in pixels."""
    scale = img_wh[:, None]
    wh = boxes[..., 2:].clamp(min=1e-4) * scale  # a learned box must never reach log(0)
    z = 0.5 * wh.log2().sum(-1, keepdim=True)
    r = wh[..., 1:].log2() - wh[..., :1].log2()
    return torch.cat([boxes[..., :2] * scale, z, r], -1)


def xyzr_to_boxes(xyzr: Tensor, img_wh: Tensor) -> Tensor:
    """[B, N, 4] (x, y, z, r) in pixels, img_wh [B, 2] -> [B, N, 4] normalized cxcywh."""
    return torch.cat([xyzr[..., :2], box_size(xyzr)], -1) / img_wh.repeat(1, 2)[:, None]


def xyzr_position_encoding(xyzr: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """[B, N, 4] -> [B, N, dim]: dim/4 interleaved sin/cos features per coordinate, x and y in thousands of
    pixels, z and r as they are (the official's scaling)."""
    n = dim // 4
    coords = xyzr * cached_device_constant((1e-3, 1e-3, 1.0, 1.0), xyzr)  # new_tensor would copy blocking
    i = torch.arange(n, dtype=xyzr.dtype, device=xyzr.device)
    angles = coords[..., None] / temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / n)  # [B, N, 4, n]
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(-3)


def log_iof(xyzr: Tensor) -> Tensor:
    """[B, N, 4] -> [B, N, N] log(area(box_i & box_j) / area(box_i) + 1e-7): how much of query i's box lies in
    query j's; -16 for disjoint boxes, so a positive temperature keeps a query's attention near its box."""
    wh = box_size(xyzr)
    lo, hi = xyzr[..., :2] - wh / 2, xyzr[..., :2] + wh / 2
    inter = (torch.min(hi[:, :, None], hi[:, None]) - torch.max(lo[:, :, None], lo[:, None])).clamp(min=0).prod(-1)
    return (inter / wh.prod(-1)[:, :, None] + 1e-7).log()


class BiasedSelfAttention(nn.Module):
    """Multi-head self-attention with an additive per-head bias on the attention logits."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, N, d], bias [B, h, N, N] (-inf = may not attend) -> [B, N, d]."""
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each [B, h, N, d/h]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, d))


def _branch(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), LayerNorm(dim), nn.ReLU(inplace=True))


class AdaMixerStage(nn.Module):
    """One decoder stage with its own heads: (content, position) -> (content, logits, refined position)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, num_classes: int, groups: int,
                 in_points: int, out_points: int):
        super().__init__()
        self.self_attn = BiasedSelfAttention(dim, num_heads, dropout)
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self.attn_norm = LayerNorm(dim)
        self.sampling_mixing = AdaptiveSamplingMixing(dim, groups, in_points, out_points)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.class_branch, self.class_head = _branch(dim), nn.Linear(dim, num_classes)
        self.box_branch, self.box_head = _branch(dim), nn.Linear(dim, 4)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation: xavier on every matrix, focal prior 0.01 on the classes, no box
        refinement at first, IoF temperatures uniform in [0, 4], then the sampling/mixing's own."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.box_head.weight)
        nn.init.zeros_(self.box_head.bias)
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)
        self.sampling_mixing.reset_parameters()

    def forward(self, content: Tensor, xyzr: Tensor, features: list[Tensor], strides: list[int],
                group_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """content [B, N, d], xyzr [B, N, 4] (pixels), features L maps [B, d, H_j, W_j], group_mask [N, N]
        (0 within a query group, -inf across) or None -> content [B, N, d], logits [B, N, C], xyzr [B, N, 4]."""
        with torch.no_grad():  # the official lets no gradient through the encoding or the IoF of the boxes
            pe = xyzr_position_encoding(xyzr, content.shape[-1]).to(content.dtype)
            iof = log_iof(xyzr)
        bias = iof[:, None] * self.iof_tau[:, None, None]  # [B, h, N, N]
        if group_mask is not None:
            bias = bias + group_mask
        # as the official (mmcv attention with identity = query): the encoding also enters the residual
        x = content + pe
        content = self.attn_norm(x + self.self_attn(x, bias))
        content = self.sampling_mixing(content, xyzr, features, strides)
        content = self.ffn_norm(content + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(content))))))
        logits = self.class_head(self.class_branch(content))
        delta = self.box_head(self.box_branch(content))
        xy = xyzr[..., :2] + delta[..., :2] * torch.pow(2.0, xyzr[..., 2:3])  # centre moves in box units
        return content, logits, torch.cat([xy, xyzr[..., 2:] + delta[..., 2:]], -1)


class AdaMixer(nn.Module):
    """images [B, 3, H, W] (+ padding mask) -> DetectorOutput; see output.py for the contract.

    groups, in_points, out_points: the mixers' G, P_in, P_out; None = the config's (official: 4, 32, 128).
    """

    def __init__(self, config: ModelConfig, num_classes: int, groups: Optional[int] = None,
                 in_points: Optional[int] = None, out_points: Optional[int] = None):
        super().__init__()
        d, levels = config.hidden_dim, config.levels
        groups = groups or config.mixing_groups
        in_points, out_points = in_points or config.mixing_in_points, out_points or config.mixing_out_points
        if d % 8 or d % groups:
            raise ValueError(f"adamixer needs hidden_dim divisible by 8 (its position encoding) and by the "
                             f"{groups} mixing groups, got {d}")
        self.config, self.num_classes, self.hidden_dim, self.num_levels = config, num_classes, d, levels
        c2 = config.finest_stride == 4
        self.backbone = Backbone(config.backbone, min(levels - c2, 3), config.backbone_weights,
                                 config.train_backbone, config.norm, with_c2=c2)
        extra = levels - len(self.backbone.channels)
        self.strides = [4] * c2 + [8, 16, 32][3 - self.backbone.num_levels:] + [64 * 2 ** i for i in range(extra)]
        self.input_proj = nn.ModuleList(nn.Conv2d(c, d, 1) for c in self.backbone.channels)
        self.extra_convs = nn.ModuleList(nn.Conv2d(d, d, 3, stride=2, padding=1) for _ in range(extra))
        self.feature_norm = nn.GroupNorm(math.gcd(32, d), d)  # one norm shared by all levels, as the official
        self.stages = nn.ModuleList(
            AdaMixerStage(d, config.num_heads, config.ffn, config.dropout, num_classes, groups, in_points,
                          out_points) for _ in range(config.decoder_layers))
        self.query_content = nn.Embedding(config.num_queries, d)
        self.query_boxes = nn.Embedding(config.num_queries, 4)  # normalized cxcywh
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        for conv in list(self.input_proj) + list(self.extra_convs):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        for stage in self.stages:
            stage.reset_parameters()
        self.query_boxes.weight.copy_(torch.tensor([0.5, 0.5, 1.0, 1.0]))  # every query starts as the whole image

    def multi_scale_features(self, images: Tensor, padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """-> normalised maps [B, d, H_j, W_j] and padding masks [B, H_j, W_j], finest level first."""
        backbone_out = self.backbone(images, padding_mask)
        maps = [proj(f) for proj, (f, _) in zip(self.input_proj, backbone_out)]
        masks = [m for _, m in backbone_out]
        for conv in self.extra_convs:
            maps.append(conv(maps[-1]))
            masks.append(F.interpolate(padding_mask[None].float(), size=maps[-1].shape[-2:])[0].bool())
        return [self.feature_norm(f) for f in maps], masks

    def decode(self, features: list[Tensor], img_wh: Tensor, groups: list[QueryGroup]) -> list[DecoderPredictions]:
        """Run query groups through the stages in one pass; a group attends only to itself.
        features L maps [B, d, H_j, W_j], img_wh [B, 2] -> per group DecoderPredictions ([L, B, N_g, ...])."""
        B, d = img_wh.shape[0], self.hidden_dim
        sizes = [g.num_queries for g in groups]
        content = F.layer_norm(torch.cat([g.content for g in groups]), (d,)).expand(B, -1, -1)  # [B, N, d]
        xyzr = boxes_to_xyzr(torch.cat([g.boxes for g in groups]).expand(B, -1, -1), img_wh)
        blocked = cross_group_mask(sizes, img_wh.device)
        group_mask = None if blocked is None else \
            torch.zeros(blocked.shape, device=img_wh.device).masked_fill(blocked, float("-inf"))
        logits, boxes, hidden = [], [], []
        for stage in self.stages:
            content, stage_logits, refined = stage(content, xyzr, features, self.strides, group_mask)
            logits.append(stage_logits)
            boxes.append(xyzr_to_boxes(refined, img_wh))
            hidden.append(content)
            xyzr = refined.detach()
        return DecoderPredictions(torch.stack(logits), torch.stack(boxes), torch.stack(hidden)).split(sizes)

    def forward(self, images: Tensor, padding_mask: Optional[Tensor] = None,
                queries: Optional[QueryGroup] = None) -> DetectorOutput:
        """images [B, 3, H, W]; padding_mask [B, H, W] bool (True = padding) or None; queries: an extra group
        (content [N2, d] and boxes [N2, 4] normalized cxcywh, e.g. a detached teacher's) decoded separately
        by this model's stages -> DetectorOutput (memory = the flattened features: there is no encoder)."""
        B, _, H, W = images.shape
        if padding_mask is None:
            padding_mask = torch.zeros(B, H, W, dtype=torch.bool, device=images.device)
        if queries is not None:
            self._check_group(queries)
        features, masks = self.multi_scale_features(images, padding_mask)
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)  # [B, S, d]
        img_wh = image_sizes(padding_mask)
        own = QueryGroup(content=self.query_content.weight, boxes=self.query_boxes.weight)
        preds = self.decode(features, img_wh, [own] if queries is None else [own, queries])
        return DetectorOutput(predictions=preds[0], features=features, masks=masks, memory=memory, queries=own,
                              extra=preds[1] if queries is not None else None, aux={"image_sizes": img_wh})

    def _check_group(self, queries: QueryGroup) -> None:
        content, boxes, d = queries.content, queries.boxes, self.hidden_dim
        if content is None or boxes is None:
            raise ValueError(f"adamixer needs an extra query group with content [N, {d}] and boxes [N, 4] "
                             "(normalized cxcywh); this group lacks "
                             + " and ".join(n for n, t in (("content", content), ("boxes", boxes)) if t is None))
        if content.dim() != 2 or content.shape[1] != d or tuple(boxes.shape) != (content.shape[0], 4):
            raise ValueError(f"adamixer needs an extra query group with content [N, {d}] and boxes [N, 4]; "
                             f"got content {tuple(content.shape)} and boxes {tuple(boxes.shape)}")
