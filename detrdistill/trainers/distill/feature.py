"""Target-aware feature distillation (METHOD.md section 2).

Plain imitation of the whole feature map does not help DETRs. The teacher's decoder queries say where the
useful features are: each teacher decoder layer's top-K (query, class) pairs, weighted by a quality score
(probability x best IoU with ground truth), vote for positions whose feature is similar (cosine) to their
query embedding. The resulting mask weights a per-level MSE between teacher and (adapted) student features.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrdistill.trainers.box_ops import pairwise_iou
from detrdistill.trainers.config import FeatureKDConfig
from detrdistill.trainers.models.output import DecoderPredictions


def feature_adapters(student_dim: int, teacher_dim: int, num_levels: int) -> nn.ModuleList:
    """phi: a 1x1 conv per level when widths differ, identity otherwise."""
    make = (lambda: nn.Conv2d(student_dim, teacher_dim, 1)) if student_dim != teacher_dim else nn.Identity
    return nn.ModuleList([make() for _ in range(num_levels)])


def query_quality(probs: Tensor, boxes: Tensor, targets: list, top_k: int, use_quality: bool):
    """Top-K (query, class) pairs of one teacher layer and their weights.

    probs [B, N, C] sigmoid probabilities, boxes [B, N, 4] cxcywh -> (query index [B, K], weight [B, K]).
    weight = prob x max IoU with any ground-truth box (just prob when the image has none, or when
    use_quality is False: the paper's plain-mask ablation, where every selected query counts 1).
    """
    B, N, C = probs.shape
    k = min(top_k, N * C)
    scores, flat = probs.flatten(1).topk(k, dim=1)
    query = flat // C
    if not use_quality:
        return query, torch.ones_like(scores)
    weights = []
    for b in range(B):
        gt = targets[b]["boxes"]
        if gt.numel() == 0:
            weights.append(scores[b])
            continue
        best_iou = pairwise_iou(boxes[b, query[b]], gt.to(boxes.dtype)).max(dim=1).values
        weights.append(scores[b] * best_iou)
    return query, torch.stack(weights)


def selection_mask(feature: Tensor, queries: Tensor, weights: Tensor) -> Tensor:
    """feature [B, d, H, W], queries [B, K, d], weights [B, K] -> psi [B, H, W].

    psi(h, w) = sum_k s_k cos(q_k, F(:, h, w)), clamped at 0.01 and divided by its per-image maximum.
    """
    f = F.normalize(feature.flatten(2), dim=1)                    # [B, d, HW]
    q = F.normalize(queries, dim=-1)                               # [B, K, d]
    psi = torch.einsum("bk,bkd,bdp->bp", weights, q, f)            # [B, HW]
    psi = psi.clamp(min=0.01)
    psi = psi / psi.max(dim=1, keepdim=True).values
    return psi.view(feature.shape[0], *feature.shape[-2:])


def feature_distillation(student_features: list, teacher_features: list, teacher: DecoderPredictions,
                         targets: list, adapters: nn.ModuleList, cfg: FeatureKDConfig) -> dict:
    """sum over teacher layers t and levels j of mean((psi_t,j * F_T_j - psi_t,j * phi(F_S_j))^2).

    student_features / teacher_features: per level [B, d_S, H_j, W_j] / [B, d_T, H_j, W_j].
    Returns the weighted total 'kd_feature'.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"feature distillation needs as many feature levels in the student "
                         f"({len(student_features)}) as in the teacher ({len(teacher_features)})")
    adapted = [phi(fs) for phi, fs in zip(adapters, student_features)]
    teacher_features = [ft.detach().float() for ft in teacher_features]
    total = adapted[0].new_zeros(())
    with torch.no_grad():
        probs = teacher.logits.detach().float().sigmoid()         # [L_T, B, N, C]
        masks = []
        for t in range(probs.shape[0]):
            query, weight = query_quality(probs[t], teacher.boxes[t].detach().float(), targets, cfg.top_k,
                                          cfg.quality)
            q = torch.gather(teacher.hidden[t].detach().float(), 1,
                             query[..., None].expand(-1, -1, teacher.hidden.shape[-1]))
            masks.append([selection_mask(ft, q, weight) for ft in teacher_features])
    for level_masks in masks:
        for psi, ft, fs in zip(level_masks, teacher_features, adapted):
            psi = psi[:, None]
            total = total + ((psi * ft - psi * fs.float()) ** 2).mean()
    return {"kd_feature": cfg.weight * total}
