"""The DETR set loss with sigmoid focal classification (Deformable DETR's), on every decoder layer.

Per layer, after a one-to-one match of queries to targets:
  cls  = sum over queries and classes of focal(logit, one-hot target) / num_boxes  (unmatched -> all zeros)
  l1   = sum over matched pairs of |b_pred - b_tgt|_1 / num_boxes                   (normalized cxcywh)
  giou = sum over matched pairs of (1 - GIoU) / num_boxes
num_boxes is the number of target boxes in the batch (at least 1), so every term is per ground-truth box.

Shapes: L decoder layers, B images, N queries, C classes.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.box_ops import elementwise_giou
from trainers.config import LossConfig
from trainers.matching import HungarianMatcher, Indices
from trainers.models.constants import cached_device_constant, host_to_device
from trainers.models.output import DecoderPredictions


def float32_losses(device: torch.device):
    """Context in which losses and matching costs run: bf16 autocast off. Under autocast a matrix product of
    two float32 tensors still runs in bf16 (the KD cost's class term, the feature mask's cosines: sums of ~100
    products, whose rounding decides close matches); off, every operator takes its inputs' dtype, and each
    skips autocast's dispatch (host time, which a GPU step at batch 2 waits on). Detector outputs enter as
    bf16 and are made float32 where a loss reads them."""
    return torch.autocast(device.type, enabled=False)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise focal loss (RetinaNet), [...] logits and {0, 1} (or soft) targets -> [...]."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def flat_matches(indices: list[Indices], num_images: int, device,
                 target_offsets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[G][B] per-image (row_idx, col_idx) -> (group [K], image [K], row [K], col [K]) int64 on `device`,
    K = all matches of all groups. With `target_offsets` [B] the columns become rows of the batch's
    concatenated targets (image b's target j is row target_offsets[b] + j). Built on the CPU and moved in
    one copy: a GPU step pays one transfer, not one per image and layer."""
    pairs = [(rows.cpu(), cols.cpu()) for per_image in indices for rows, cols in per_image]
    if len(pairs) != len(indices) * num_images:
        raise ValueError(f"indices cover {len(pairs)} images, expected {len(indices)} groups x {num_images}")
    # numpy: torch's repeat_interleave sizes its output from values (on a GPU, a read back to the host); these
    # values are the host's, and outside torch a step has no such operator at all (tests/test_distill.py)
    group_image = torch.from_numpy(np.repeat(np.arange(len(pairs), dtype=np.int64), [len(r) for r, _ in pairs]))
    image = group_image % num_images
    rows = torch.cat([r.long() for r, _ in pairs]) if pairs else torch.zeros(0, dtype=torch.long)
    cols = torch.cat([c.long() for _, c in pairs]) if pairs else torch.zeros(0, dtype=torch.long)
    if target_offsets is not None:
        cols = cols + target_offsets[image]
    flat = host_to_device(torch.stack([group_image // num_images, image, rows, cols]), device)
    return flat[0], flat[1], flat[2], flat[3]


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
        return self.start_indices(predictions, targets)()

    def start_indices(self, predictions: DecoderPredictions, targets: list[dict]) -> Callable[[], list[Indices]]:
        """`indices_for` in two halves: the matching costs queued now, `wait()` -> the indices. On a GPU the
        caller queues other work in between, while the host solves (accel.start_on_host)."""
        return self.matcher.start(predictions.logits, predictions.boxes, targets)

    def layer_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict], indices: list[Indices],
                     num_boxes: float | None = None) -> dict:
        """G groups at once (decoder layers): logits [G, B, N, C], boxes [G, B, N, 4], indices [G][B] ->
        {'cls', 'l1', 'giou'}, each [G]. One batched computation whatever G: on a GPU the loss costs the
        same few kernels for 1 layer or 6.

        The indices may come from elsewhere (query-prior distillation supervises the student's extra
        query group with the teacher's assignment). Computed in float32 whatever the autocast dtype.
        """
        if num_boxes is None:
            num_boxes = count_boxes(targets)
        logits, boxes = logits.float(), boxes.float()
        G = logits.shape[0]
        offsets = torch.tensor([0] + [len(t["labels"]) for t in targets[:-1]]).cumsum(0)
        group, image, query, target = flat_matches(indices, len(targets), logits.device, offsets)
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)[target]
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device, torch.float32)[target]

        onehot = torch.zeros_like(logits)
        onehot[group, image, query, tgt_labels] = 1.0
        cls = sigmoid_focal_loss(logits, onehot, self.cfg.focal_alpha, self.cfg.focal_gamma).flatten(1).sum(1)

        src_boxes = boxes[group, image, query]  # [K, 4]
        per_match = torch.stack([(src_boxes - tgt_boxes).abs().sum(-1), 1 - elementwise_giou(src_boxes, tgt_boxes)], 1)
        l1, giou = logits.new_zeros(G, 2).index_add_(0, group, per_match).unbind(1)
        return {"cls": cls / num_boxes, "l1": l1 / num_boxes, "giou": giou / num_boxes}

    def layer_loss(self, logits: Tensor, boxes: Tensor, targets: list[dict], indices: Indices,
                   num_boxes: float | None = None) -> dict:
        """One layer: logits [B, N, C], boxes [B, N, 4], per-image indices -> {'cls', 'l1', 'giou'} scalars."""
        terms = self.layer_losses(logits[None], boxes[None], targets, [indices], num_boxes)
        return {k: v[0] for k, v in terms.items()}

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
        return self.summed(self.layer_losses(predictions.logits, predictions.boxes, targets, indices))

    def summed(self, terms: dict) -> dict:
        """Per-layer terms {'cls', 'l1', 'giou'}, each [L] (`layer_losses`) -> `forward`'s dict."""
        sums = self.term_sums(terms)
        out = {"loss": weighted_sum(sums, list(self.weights.values()))}
        for i, k in enumerate(self.weights):  # logging only: detached, so float() on them is free and silent
            out[f"loss_{k}"] = sums[i].detach()
            out[f"loss_{k}_last"] = terms[k][-1].detach()
        return out

    def term_sums(self, terms: dict) -> Tensor:
        """Per-layer terms {'cls', 'l1', 'giou'} [L] -> each summed over layers, [3] in `self.weights`' order."""
        return torch.stack([terms[k] for k in self.weights]).sum(1)


def weighted_sum(values: Tensor, weights: list[float]) -> Tensor:
    """values [K], K Python weights -> sum_i weights[i] * values[i], as one dot product with the weights on the
    values' device (copied there once): every loss of a step ends in such a sum, and on a GPU each operator of
    it, forward and backward, is a launch (a multiply and an add a term, and a select's backward each)."""
    return torch.dot(values, cached_device_constant(tuple(weights), values))
