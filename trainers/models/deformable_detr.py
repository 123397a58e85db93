"""Deformable DETR (Zhu et al., ICLR 2021): single stage, no iterative box refinement, as DETRDistill's configs.

Backbone maps (strides 8/16/32) are projected to d channels (plus stride-2 convs for extra levels), encoded
by deformable self-attention over all levels, and decoded by N learned queries that each look at a few
points around a reference point predicted from their positional half. Heads are shared by all decoder layers;
a layer's box is an offset from its query's (fixed) reference point in inverse-sigmoid space.

Parameters with lr x0.1 in the official recipe are named `*sampling_offsets*` and `reference_points.*`
(see `linear_proj_parameter_names`).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.box_ops import inverse_sigmoid
from trainers.config import ModelConfig
from trainers.models.backbone import Backbone
from trainers.models.ms_deform_attn import MSDeformAttn
from trainers.models.multi_scale import LevelProjections
from trainers.models.output import DecoderPredictions, DetectorOutput, QueryGroup, cross_group_mask
from trainers.models.position_encoding import sine_position_encoding
from trainers.models.transformer_layers import MLP, LayerNorm, attention_bias, matmul_dtype

LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels, then FFN."""

    def __init__(self, d: int, heads: int, levels: int, points: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = MSDeformAttn(d, levels, heads, points)
        self.norm1 = LayerNorm(d)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm2 = LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]],
                padding_mask: Tensor) -> Tensor:
        """src, pos [B, S, d]; reference_points [B, S, L, 2]; padding_mask [B, S] -> [B, S, d]."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class DeformableDecoderLayer(nn.Module):
    """Post-norm: query self-attention (positional part added to q and k), deformable cross-attention at the
    reference points, FFN."""

    def __init__(self, d: int, heads: int, levels: int, points: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm1 = LayerNorm(d)
        self.cross_attn = MSDeformAttn(d, levels, heads, points)
        self.norm2 = LayerNorm(d)
        self.linear1 = nn.Linear(d, ffn)
        self.linear2 = nn.Linear(ffn, d)
        self.norm3 = LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: Tensor,
                self_attn_bias: Optional[Tensor] = None) -> Tensor:
        """tgt, query_pos [B, N, d]; reference_points [B, N, L, 2]; memory [B, S, d]; padding_mask [B, S];
        self_attn_bias [N, N]: the `attention_bias` between query groups, or None -> [B, N, d]."""
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_bias, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(attn))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, padding_mask)
        tgt = self.norm2(tgt + self.dropout(attn))
        return self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


def in_stream_dtype(pos: Tensor, norm: LayerNorm) -> Tensor:
    """A positional term in the dtype of the residual stream it is added to at every layer: bf16 when the
    layers' norms return bf16 under autocast (ScheduleConfig.amp_layer_norm), so that the sums feed the bf16
    matrix products without a cast each; else as it is."""
    return pos.to(matmul_dtype(pos)) if norm.bf16_output else pos


def valid_ratio(mask: Tensor) -> Tensor:
    """mask [B, H, W] (True = padding) -> [B, 2] fraction of the map's width and height that is image."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level -> [B, S, L, 2] normalized (x, y) as seen on each level.

    A centre is first normalized by its own level's valid (unpadded) size, then scaled into every level's
    padded frame by that level's valid ratio: the same image point on every level.
    """
    refs = []
    for l, (h, w) in enumerate(spatial_shapes):
        y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                              torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5, indexing="ij")
        x = x.reshape(1, -1) / (valid_ratios[:, None, l, 0] * w)
        y = y.reshape(1, -1) / (valid_ratios[:, None, l, 1] * h)
        refs.append(torch.stack([x, y], -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


class DeformableDETR(nn.Module):
    """images [B, 3, H, W] (+ padding mask) -> DetectorOutput; see output.py for the contract."""

    def __init__(self, config: ModelConfig, num_classes: int):
        super().__init__()
        d, levels = config.hidden_dim, config.levels
        self.config, self.hidden_dim, self.num_levels, self.num_classes = config, d, levels, num_classes
        self.backbone = Backbone(config.backbone, min(levels, 3), config.backbone_weights, config.train_backbone,
                                 config.norm)
        self.input_proj = LevelProjections(self.backbone.channels, d, levels)
        # Only the encoder reads position encodings; without one a level embedding would be an unused parameter.
        self.level_embed = nn.Parameter(torch.empty(levels, d)) if config.encoder_layers else None
        layer_args = (d, config.num_heads, levels, config.num_points, config.ffn, config.dropout)
        self.encoder = nn.ModuleList(DeformableEncoderLayer(*layer_args) for _ in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DeformableDecoderLayer(*layer_args) for _ in range(config.decoder_layers))
        self.query_embed = nn.Embedding(config.num_queries, 2 * d)  # [positional | content]
        self.reference_points = nn.Linear(d, 2)
        self.class_head = nn.Linear(d, num_classes)
        self.box_head = MLP(d, d, 4, 3)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # the official Deformable DETR initialisation
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.zeros_(self.reference_points.bias)
        self.input_proj.reset_parameters()
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)
        nn.init.constant_(self.box_head.layers[-1].bias[2:], -2.0)  # initial w, h = sigmoid(-2) ~ 0.12

    def linear_proj_parameter_names(self) -> list[str]:
        """Names of the parameters the official recipe trains at lr x0.1: every deformable attention's
        `sampling_offsets` and the query `reference_points` layer."""
        return [n for n, _ in self.named_parameters() if any(k in n for k in LINEAR_PROJ_NAMES)]

    def multi_scale_features(self, images: Tensor, padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """-> projected maps [B, d, H_j, W_j] and padding masks [B, H_j, W_j], finest level first."""
        return self.input_proj(self.backbone(images, padding_mask), padding_mask)

    def encode(self, features: list[Tensor], masks: list[Tensor], valid_ratios: Tensor) -> Tensor:
        """Flatten the levels and run the encoder -> memory [B, S, d] (the flat features if no encoder)."""
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
        if not self.encoder:
            return src
        pos = [sine_position_encoding(m, self.hidden_dim, offset=-0.5).to(f.dtype) for f, m in zip(features, masks)]
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[j] for j, p in enumerate(pos)], 1)
        pos = in_stream_dtype(pos, self.encoder[0].norm1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        shapes = [tuple(f.shape[-2:]) for f in features]
        reference_points = encoder_reference_points(shapes, valid_ratios)
        for layer in self.encoder:
            src = layer(src, pos, reference_points, shapes, mask)
        return src

    def decode(self, memory: Tensor, masks: list[Tensor], valid_ratios: Tensor,
               groups: list[QueryGroup]) -> tuple[list[DecoderPredictions], Tensor]:
        """Run query groups through the decoder and heads in one pass; a group attends only to itself.

        -> per group DecoderPredictions ([L, B, N_g, ...]) and reference points [B, N_g, 2].
        """
        B = memory.shape[0]
        sizes = [g.num_queries for g in groups]
        position = torch.cat([g.position for g in groups])  # [N, d]
        tgt = torch.cat([g.content for g in groups]).expand(B, -1, -1)
        reference = self.reference_points(position).sigmoid().expand(B, -1, -1)  # [B, N, 2] in the image
        query_pos = in_stream_dtype(position.expand(B, -1, -1), self.decoder[0].norm1)
        # own group only, as an additive bias made once (a bool mask is converted at every layer's call)
        blocked = cross_group_mask(sizes, memory.device)
        self_attn_bias = None if blocked is None else attention_bias(blocked, matmul_dtype(query_pos))
        reference_in_levels = reference[:, :, None] * valid_ratios[:, None]  # [B, N, L, 2] padded frames
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        shapes = [tuple(m.shape[-2:]) for m in masks]
        hidden = []
        for layer in self.decoder:
            tgt = layer(tgt, query_pos, reference_in_levels, memory, shapes, mask, self_attn_bias)
            hidden.append(tgt)
        hidden = torch.stack(hidden)  # [L, B, N, d]
        logits = self.class_head(hidden)
        delta = self.box_head(hidden)
        boxes = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
        return DecoderPredictions(logits, boxes, hidden).split(sizes), list(reference.split(sizes, 1))

    def forward(self, images: Tensor, padding_mask: Optional[Tensor] = None,
                queries: Optional[QueryGroup] = None) -> DetectorOutput:
        """images [B, 3, H, W]; padding_mask [B, H, W] bool (True = padding) or None; queries: an extra group
        (position and content [N2, d], e.g. a detached teacher's) decoded separately by this model's decoder
        and heads, reference points from this model's `reference_points` layer -> DetectorOutput."""
        B, _, H, W = images.shape
        if padding_mask is None:
            padding_mask = torch.zeros(B, H, W, dtype=torch.bool, device=images.device)
        if queries is not None:
            if queries.position is None or queries.content is None:
                raise ValueError("deformable_detr needs an extra query group with both position and content")
            if queries.position.shape[-1] != self.hidden_dim or queries.content.shape[-1] != self.hidden_dim:
                raise ValueError(f"extra queries have width {queries.position.shape[-1]}, "
                                 f"this model's hidden_dim is {self.hidden_dim}")
        features, masks = self.multi_scale_features(images, padding_mask)
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)  # [B, L, 2]
        memory = self.encode(features, masks, valid_ratios)
        position, content = self.query_embed.weight.split(self.hidden_dim, dim=1)
        own = QueryGroup(position=position, content=content)
        groups = [own] if queries is None else [own, queries]
        preds, references = self.decode(memory, masks, valid_ratios, groups)
        aux = {"reference_points": references[0]}  # [B, N, 2] normalized (x, y) in the image, not the padded canvas
        if queries is not None:
            aux["extra_reference_points"] = references[1]
        return DetectorOutput(predictions=preds[0], features=features, masks=masks, memory=memory, queries=own,
                              extra=preds[1] if queries is not None else None, aux=aux)
