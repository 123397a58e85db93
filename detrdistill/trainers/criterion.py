"""The DETR set loss with sigmoid focal classification (Deformable DETR's), on every decoder layer.

Per layer, after a one-to-one match of queries to targets:
  cls  = sum over queries and classes of focal(logit, one-hot target) / num_boxes  (unmatched -> all zeros)
  l1   = sum over matched pairs of |b_pred - b_tgt|_1 / num_boxes                   (normalized cxcywh)
  giou = sum over matched pairs of (1 - GIoU) / num_boxes
num_boxes is the number of target boxes in the batch (at least 1), so every term is per ground-truth box.

Shapes: L decoder layers, B images, N queries, C classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrdistill.trainers.box_ops import elementwise_giou
from detrdistill.trainers.config import LossConfig
from detrdistill.trainers.matching import HungarianMatcher, Indices
from detrdistill.trainers.models.output import DecoderPredictions


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise focal loss (RetinaNet), [...] logits and {0, 1} (or soft) targets -> [...]."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def matched_positions(indices: Indices, device) -> tuple[Tensor, Tensor]:
    """Per-image indices -> (batch_idx [K], query_idx [K]) over the whole batch, K = sum of matches."""
    batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    query = torch.cat([src for src, _ in indices])
    return batch.to(device), query.to(device)


def count_boxes(targets: list[dict]) -> float:
    """Number of target boxes in the batch, at least 1 (an all-background batch must not divide by 0)."""
    return max(float(sum(len(t["labels"]) for t in targets)), 1.0)


class SetCriterion(nn.Module):
    """DETR set loss on every decoder layer (aux loss). No parameters; a module only for `.to()`/hooks."""

    def __init__(self, num_classes: int, loss_config: LossConfig | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.cfg = cfg = loss_config or LossConfig()
        self.weights = {"cls": cfg.cls_weight, "l1": cfg.l1_weight, "giou": cfg.giou_weight}
        self.matcher = HungarianMatcher(cfg.match_cls, cfg.match_l1, cfg.match_giou, cfg.focal_alpha, cfg.focal_gamma)

    def indices_for(self, predictions: DecoderPredictions, targets: list[dict]) -> list[Indices]:
        """[L][B] (pred_idx, tgt_idx): every layer matched to the targets, in one batched solve."""
        return self.matcher.match_layers(predictions, targets)

    def layer_loss(self, logits: Tensor, boxes: Tensor, targets: list[dict], indices: Indices,
                   num_boxes: float | None = None) -> dict:
        """logits [B, N, C], boxes [B, N, 4], given per-image indices -> {'cls', 'l1', 'giou'} scalars.

        The indices may come from elsewhere (query-prior distillation supervises the student's extra
        query group with the teacher's assignment). Computed in float32 whatever the autocast dtype.
        """
        if num_boxes is None:
            num_boxes = count_boxes(targets)
        logits, boxes = logits.float(), boxes.float()
        batch, query = matched_positions(indices, logits.device)
        tgt_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
        tgt_labels, tgt_boxes = tgt_labels.to(logits.device), tgt_boxes.to(logits.device, torch.float32)

        onehot = torch.zeros_like(logits)
        onehot[batch, query, tgt_labels] = 1.0
        cls = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma).sum() / num_boxes

        src_boxes = boxes[batch, query]  # [K, 4]
        l1 = (src_boxes - tgt_boxes).abs().sum() / num_boxes
        giou = (1 - elementwise_giou(src_boxes, tgt_boxes)).sum() / num_boxes
        return {"cls": cls, "l1": l1, "giou": giou}

    def forward(self, predictions: DecoderPredictions, targets: list[dict],
                indices: list[Indices] | None = None) -> dict:
        """Set loss summed over decoder layers.

        indices: [L][B] precomputed assignment (default: match every layer to the targets).
        Returns 'loss' (weighted, summed over layers and terms; the one to backpropagate), and for logging
        the unweighted terms summed over layers ('loss_cls', 'loss_l1', 'loss_giou') and of the last layer
        ('loss_cls_last', 'loss_l1_last', 'loss_giou_last'), detached.
        """
        if indices is None:
            indices = self.indices_for(predictions, targets)
        if len(indices) != predictions.num_layers:
            raise ValueError(f"got indices for {len(indices)} layers, predictions have {predictions.num_layers}")
        num_boxes = count_boxes(targets)
        per_layer = [self.layer_loss(predictions.logits[l], predictions.boxes[l], targets, indices[l], num_boxes)
                     for l in range(predictions.num_layers)]
        out = {"loss": sum(self.weights[k] * layer[k] for layer in per_layer for k in self.weights)}
        for k in self.weights:  # logging only: detached, so float() on them is free and silent
            out[f"loss_{k}"] = sum(layer[k] for layer in per_layer).detach()
            out[f"loss_{k}_last"] = per_layer[-1][k].detach()
        return out
