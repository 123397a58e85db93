"""Conditional DETR (Meng et al., ICCV 2021), laid out as transformers' ConditionalDetr so its weights load.

One feature level (C5, or DC5), as in the paper; with `num_feature_levels` > 1 the memory is Deformable DETR's
pyramid (strides 8, 16, 32, then stride-2 convolutions) flattened into one sequence under the same global
attention, with a learned embedding per level added to the encoder's positions.
The decoder learns a reference point per query from its positional embedding; each layer's cross-attention
concatenates, per head, a content part and a spatial part (the sine embedding of the reference point scaled by
a function of the content), so a query attends to the region around its reference.
Boxes are predicted relative to the reference point. Sigmoid (focal) classification, no no-object class.

Shapes: B images, N queries, C classes, d hidden size, h heads, L decoder layers, S memory positions (the
cells of every level).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.box_ops import inverse_sigmoid
from trainers.config import ModelConfig
from trainers.models.backbone import Backbone
from trainers.models.multi_scale import LevelProjections, join_levels
from trainers.models.output import DecoderPredictions, DetectorOutput, QueryGroup, cross_group_mask
from trainers.models.position_encoding import sine_box_encoding, sine_position_encoding
from trainers.models.transformer_layers import MLP, EncoderLayer, LayerNorm, linear_many, \
    attention_bias, matmul_dtype, multi_head_attention


# attention_init "local": the spatial projections' gain, which sharpens the first cross-attention; how 3 was
# chosen over other gains on the small config: docs/small_config.md
LOCAL_GAIN = 3.0


class ProjectedPositions(NamedTuple):
    """One decoder layer's positional terms, already through its projections (the decoder computes those of
    every layer at once: the inputs are the same for all layers). Each [B, N, d] or [B, S, d]."""
    self_q: Tensor            # query_pos through self_attn.q_pos_proj
    self_k: Tensor            # query_pos through self_attn.k_pos_proj
    cross_q: Optional[Tensor]  # query_pos through cross_attn.q_pos_proj (first layer only, else None)
    cross_k: Tensor           # memory_pos through cross_attn.k_pos_proj


class ConditionalSelfAttention(nn.Module):
    """Decoder self-attention; content and position are projected separately, then summed for q and k."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_content_proj = nn.Linear(dim, dim)
        self.q_pos_proj = nn.Linear(dim, dim)
        self.k_content_proj = nn.Linear(dim, dim)
        self.k_pos_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, tgt: Tensor, q_pos: Tensor, k_pos: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """tgt [B, N, d]; q_pos, k_pos [B, N, d]: query_pos through q_pos_proj / k_pos_proj; bias [N, N]: the
        `attention_bias` between query groups, or None -> [B, N, d]."""
        q_content, k_content, v = linear_many(tgt, [self.q_content_proj, self.k_content_proj, self.v_proj])
        return self.out_proj(multi_head_attention(q_content + q_pos, k_content + k_pos, v, self.num_heads, bias))


class ConditionalCrossAttention(nn.Module):
    """Conditional cross-attention: per head, q = [content, spatial query], k = [content, key position],
    so the attention weight is a content term plus a spatial term. Only the first layer also adds the
    positional embeddings into the content parts (it has no content to condition on yet)."""

    def __init__(self, dim: int, num_heads: int, first: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q_content_proj = nn.Linear(dim, dim)
        self.q_pos_proj = nn.Linear(dim, dim) if first else None
        self.k_content_proj = nn.Linear(dim, dim)
        self.k_pos_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_pos_sine_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, tgt: Tensor, q_pos: Optional[Tensor], query_sine: Tensor, memory: Tensor, k_pos: Tensor,
                memory_bias: Optional[Tensor]) -> Tensor:
        """tgt, query_sine [B, N, d]; q_pos: query_pos through q_pos_proj (first layer) or None; memory [B, S, d];
        k_pos [B, S, d]: memory_pos through k_pos_proj; memory_bias [B, 1, 1, S]: `attention_bias` of the
        padding -> [B, N, d]."""
        (B, N, _), S, h = tgt.shape, memory.shape[1], self.num_heads
        q = self.q_content_proj(tgt)
        k, v = linear_many(memory, [self.k_content_proj, self.v_proj])
        if q_pos is not None:
            q = q + q_pos
            k = k + k_pos
        q_sine = self.q_pos_sine_proj(query_sine)
        # concatenate per head, so each head's q.k is content.content + spatial.spatial; widths double
        q = torch.cat([q.view(B, N, h, -1), q_sine.view(B, N, h, -1)], dim=-1).flatten(2)  # [B, N, 2d]
        k = torch.cat([k.view(B, S, h, -1), k_pos.view(B, S, h, -1)], dim=-1).flatten(2)   # [B, S, 2d]
        return self.out_proj(multi_head_attention(q, k, v, h, memory_bias))


class ConditionalDecoderLayer(nn.Module):
    """Post-norm: self-attention, conditional cross-attention, ReLU FFN; each with dropout, residual, norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, first: bool):
        super().__init__()
        self.self_attn = ConditionalSelfAttention(dim, num_heads)
        self.norm1 = LayerNorm(dim)
        self.cross_attn = ConditionalCrossAttention(dim, num_heads, first)
        self.norm2 = LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm3 = LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, pos: ProjectedPositions, query_sine: Tensor, memory: Tensor,
                memory_bias: Optional[Tensor], self_attn_bias: Optional[Tensor] = None) -> Tensor:
        """tgt, query_sine [B, N, d]; pos: this layer's projected positional terms; memory [B, S, d];
        memory_bias [B, 1, 1, S], self_attn_bias [N, N] or None: `attention_bias`es -> [B, N, d]."""
        tgt = self.norm1(tgt + self.dropout(self.self_attn(tgt, pos.self_q, pos.self_k, self_attn_bias)))
        tgt = self.norm2(tgt + self.dropout(self.cross_attn(tgt, pos.cross_q, query_sine, memory, pos.cross_k,
                                                            memory_bias)))
        return self.norm3(tgt + self.dropout(self.linear2(F.relu(self.linear1(tgt)))))


class ConditionalDecoder(nn.Module):
    """Queries (positional embeddings, content starting at zero) -> every layer's normed output and the
    reference points the boxes are predicted relative to."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, num_layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(ConditionalDecoderLayer(dim, num_heads, ffn_dim, dropout, first=(i == 0))
                                    for i in range(num_layers))
        self.norm = LayerNorm(dim)  # applied to every layer's output (not fed back into the next layer)
        self.query_scale = MLP(dim, dim, dim, 2)  # content -> scale of the spatial query (layers 2..L)
        self.ref_point_head = MLP(dim, dim, 2, 2)  # positional embedding -> reference point (before sigmoid)

    def forward(self, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, memory_bias: Optional[Tensor],
                self_attn_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """query_pos [N, d], memory, memory_pos [B, S, d], memory_bias [B, 1, 1, S] (`attention_bias` of the
        padding), self_attn_bias [N, N] (`attention_bias` separating query groups) or None
        -> hidden [L, B, N, d], reference points [B, N, 2] (normalized x, y)."""
        query_pos = query_pos[None].expand(memory.shape[0], -1, -1)
        reference = self.ref_point_head(query_pos).sigmoid()
        # made in the products' dtype once (under autocast bf16: each layer's scaled copy then needs no cast)
        sine = sine_box_encoding(reference, query_pos.shape[-1] // 2).to(matmul_dtype(query_pos))  # [B, N, d]
        tgt = torch.zeros_like(query_pos)
        hidden = []
        for i, (layer, pos) in enumerate(zip(self.layers, self._project_positions(query_pos, memory_pos))):
            query_sine = sine if i == 0 else sine * self.query_scale(tgt)  # first layer: identity scale
            tgt = layer(tgt, pos, query_sine, memory, memory_bias, self_attn_bias)
            hidden.append(tgt)
        # one norm over all layers' outputs: per row, the same values as a norm per layer, in one operator
        # (and, its weight used once, one gradient: bf16 weight copies need no accumulation in bf16)
        return self.norm(torch.stack(hidden)), reference

    def _project_positions(self, query_pos: Tensor, memory_pos: Tensor) -> list[ProjectedPositions]:
        """Every layer's positional projections, two matrix multiplies in all (query_pos [B, N, d], memory_pos
        [B, S, d]): they do not depend on the layer's input."""
        query_layers = [m for layer in self.layers for m in (layer.self_attn.q_pos_proj, layer.self_attn.k_pos_proj)]
        first_cross_q = self.layers[0].cross_attn.q_pos_proj
        query_parts = linear_many(query_pos, query_layers + [first_cross_q])
        memory_parts = linear_many(memory_pos, [layer.cross_attn.k_pos_proj for layer in self.layers])
        return [ProjectedPositions(query_parts[2 * i], query_parts[2 * i + 1], query_parts[-1] if i == 0 else None,
                                   memory_parts[i]) for i in range(len(self.layers))]


class ConditionalDETR(nn.Module):
    """Backbone C5 -> 1x1 projection -> post-norm encoder -> conditional decoder -> shared class/box heads."""

    def __init__(self, config: ModelConfig, num_classes: int):
        super().__init__()
        d, levels = config.hidden_dim, config.levels
        self.config = config
        self.num_classes = num_classes
        self.backbone = Backbone(config.backbone, min(levels, 3), config.backbone_weights, config.train_backbone,
                                 config.norm, dilation=config.backbone_dilation)
        if levels == 1:  # the paper's: one 1x1 convolution, as transformers' weights have it
            self.input_proj = nn.Conv2d(self.backbone.channels[-1], d, kernel_size=1)
        else:
            self.input_proj = LevelProjections(self.backbone.channels, d, levels)
        # The encoder tells the levels apart by a learned embedding added to its positions, as Deformable DETR's.
        # The decoder's keys keep the plain sine positions: its spatial term compares positions only (a level
        # embedding there is a random per-level bias that depends on the reference point).
        self.level_embed = nn.Parameter(torch.empty(levels, d)) if levels > 1 and config.encoder_layers else None
        self.encoder = nn.ModuleList(EncoderLayer(d, config.num_heads, config.ffn, config.dropout)
                                     for _ in range(config.encoder_layers))
        self.decoder = ConditionalDecoder(d, config.num_heads, config.ffn, config.decoder_layers, config.dropout)
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.class_head = nn.Linear(d, num_classes)
        self.box_head = MLP(d, d, 4, 3)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in list(self.encoder.parameters()) + list(self.decoder.parameters()):
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # focal-loss prior: every class starts at probability 0.01, so background does not swamp the loss
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))
        # boxes start at the reference point (offset 0) with sigmoid(0) = 0.5 width and height
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)
        if isinstance(self.input_proj, LevelProjections):
            self.input_proj.reset_parameters()
        if self.level_embed is not None:
            nn.init.normal_(self.level_embed)
        if self.config.attention_init == "local":
            self._local_attention_init()

    def _local_attention_init(self) -> None:
        """attention_init "local", for training from scratch on little data (docs/small_config.md).

        From Xavier's random projections the cross-attention starts near uniform over the map, and from
        scratch on little data the queries then collapse to the image's class prior and stay there. Here, in
        every decoder layer's cross-attention, the spatial query (the reference point's sine encoding through
        q_pos_sine_proj) and the spatial key (the map's through k_pos_proj) keep, per head, the same band of
        frequencies of y and of x, so that head's spatial term starts as
            gain^2 * sum over its frequencies f of cos(f (y_ref - y)) + cos(f (x_ref - x)),
        a kernel peaked at the reference point: narrow for head 0 (the highest frequencies), wider for each
        next head. query_scale starts as the identity, so later layers start with the same kernel.
        The encoder's residual branches (attention and FFN outputs) start at zero: the encoder starts as the
        identity, so the decoder reads each position's own features rather than averages over the map.
        """
        d, h = self.config.hidden_dim, self.config.num_heads
        head_dim = d // h
        band = head_dim // 4  # frequencies per coordinate and head: a sin and a cos each, for y and for x
        select = torch.zeros(d, d)  # row: a head's spatial channel; column: a sine-encoding channel
        for head in range(h):
            rows = iter(range(head * head_dim, (head + 1) * head_dim))
            for half in (0, d // 2):  # the encodings' y channels, then x
                for f in range(head, head + band):
                    for channel in (half + 2 * f, half + 2 * f + 1):  # sin and cos of frequency f
                        select[next(rows), channel] = 1.0
        with torch.no_grad():
            for layer in self.decoder.layers:
                for proj in (layer.cross_attn.q_pos_sine_proj, layer.cross_attn.k_pos_proj):
                    proj.weight.copy_(LOCAL_GAIN * select)
                    proj.bias.zero_()
            last = self.decoder.query_scale.layers[-1]
            last.weight.zero_()
            last.bias.fill_(1.0)
            for layer in self.encoder:
                for proj in (layer.self_attn.out_proj, layer.linear2):
                    proj.weight.zero_()
                    proj.bias.zero_()

    def _heads(self, hidden: Tensor, reference: Tensor) -> DecoderPredictions:
        """hidden [L, B, N, d], reference [B, N, 2] -> predictions of every layer."""
        delta = self.box_head(hidden)  # [L, B, N, 4], (cx, cy) relative to the reference in logit space
        center = delta[..., :2] + inverse_sigmoid(reference)
        boxes = torch.cat([center, delta[..., 2:]], dim=-1).sigmoid()
        return DecoderPredictions(logits=self.class_head(hidden), boxes=boxes, hidden=hidden)

    def _features(self, images: Tensor, padding_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """-> projected maps [B, d, H_j, W_j] and padding masks [B, H_j, W_j], finest level first."""
        backbone_out = self.backbone(images, padding_mask)
        if not isinstance(self.input_proj, LevelProjections):
            (feature, mask), = backbone_out
            return [self.input_proj(feature)], [mask]
        return self.input_proj(backbone_out, padding_mask)

    def forward(self, images: Tensor, padding_mask: Optional[Tensor] = None,
                queries: Optional[QueryGroup] = None) -> DetectorOutput:
        """images [B, 3, H, W], padding_mask [B, H, W] bool (True = padding) or None; `queries`: an extra
        group (its .position [N2, d]) run through the same decoder and heads, independently of ours."""
        if padding_mask is None:
            padding_mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        d = self.config.hidden_dim
        features, masks = self._features(images, padding_mask)  # [B, d, H_j, W_j], [B, H_j, W_j] per level
        pos = [sine_position_encoding(m, d).to(f.dtype).flatten(2).transpose(1, 2) for f, m in zip(features, masks)]
        encoder_pos = pos if self.level_embed is None else [p + self.level_embed[j] for j, p in enumerate(pos)]
        pos, encoder_pos = join_levels(pos, 1), join_levels(encoder_pos, 1)  # [B, S, d], S = sum of H_j * W_j
        memory = join_levels([f.flatten(2).transpose(1, 2) for f in features], 1)  # [B, S, d]
        # the padding as an attention bias, made once for the encoder's and the decoder's attention to memory
        attention_dtype = matmul_dtype(memory)
        memory_bias = attention_bias(join_levels([m.flatten(1) for m in masks], 1)[:, None, None, :], attention_dtype)
        for layer in self.encoder:
            memory = layer(memory, encoder_pos, memory_bias)

        own = self.query_embed.weight
        groups = [own]
        if queries is not None:
            if queries.position is None or queries.position.shape[-1] != d:
                raise ValueError(f"conditional_detr needs an extra query group with position [N, {d}]")
            groups.append(queries.position)
        # all groups in one decoder pass (on a GPU: the same kernels, not twice as many); a group's queries
        # attend only to each other, so each group's result is what it would be alone
        sizes = [g.shape[0] for g in groups]
        blocked = cross_group_mask(sizes, images.device)
        hidden, reference = self.decoder(torch.cat(groups), memory, pos, memory_bias,
                                         None if blocked is None else attention_bias(blocked, attention_dtype))
        preds = self._heads(hidden, reference).split(sizes)
        reference = reference.split(sizes, 1)
        aux = {"reference": reference[0]}
        if queries is not None:
            aux["extra_reference"] = reference[1]
        return DetectorOutput(predictions=preds[0], features=features, masks=masks, memory=memory,
                              queries=QueryGroup(position=own), extra=preds[1] if queries is not None else None,
                              aux=aux)
