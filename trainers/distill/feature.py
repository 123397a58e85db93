"""Target-aware feature distillation (docs/method.md).

Plain imitation of the whole feature map does not help DETRs. The teacher's decoder queries say where the
useful features are: each teacher decoder layer's top-K (query, class) pairs, weighted by a quality score
(probability x best IoU with ground truth), vote for positions whose feature is similar (cosine) to their
query embedding. The resulting mask weights a per-level MSE between teacher and (adapted) student features.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.box_ops import batched_pairwise_iou
from trainers.config import FeatureKDConfig
from trainers.matching import pad_targets
from trainers.models.constants import host_to_device
from trainers.models.multi_scale import join_levels
from trainers.models.output import DecoderPredictions


def feature_adapters(student_dim: int, teacher_dim: int, num_levels: int) -> nn.ModuleList:
    """phi: a 1x1 conv per level when widths differ, identity otherwise."""
    make = (lambda: nn.Conv2d(student_dim, teacher_dim, 1)) if student_dim != teacher_dim else nn.Identity
    return nn.ModuleList([make() for _ in range(num_levels)])


def query_quality(probs: Tensor, boxes: Tensor, targets: list, top_k: int, use_quality: bool):
    """Top-K (query, class) pairs of each teacher layer and their weights, all layers at once.

    probs [L, B, N, C] sigmoid probabilities, boxes [L, B, N, 4] cxcywh -> (query index [L, B, K], weight
    [L, B, K]). weight = prob x max IoU with any ground-truth box of the image (just prob when the image has
    none, or when use_quality is False: the paper's plain-mask ablation, where every selected query counts 1).
    """
    L, B, N, C = probs.shape
    k = min(top_k, N * C)
    scores, flat = probs.flatten(2).topk(k, dim=2)
    query = flat // C
    if not use_quality:
        return query, torch.ones_like(scores)
    _, gt, sizes = pad_targets(targets, boxes.device)             # gt [B, M, 4], padded with full-image boxes
    if gt.shape[1] == 0:
        return query, scores
    selected = torch.gather(boxes, 2, query[..., None].expand(-1, -1, -1, 4))  # [L, B, K, 4]
    iou = batched_pairwise_iou(selected, gt.to(boxes.dtype))      # [L, B, K, M]
    # from the host, in one copy: which columns are real ground truth [B, M], which images have none [B, 1]
    m, sizes = gt.shape[1], np.asarray(sizes)
    flags = np.concatenate([np.arange(m) < sizes[:, None], sizes[:, None] == 0], 1).astype(np.float32)
    flags = host_to_device(torch.from_numpy(flags), gt.device)  # float32, as the boxes here
    real, no_gt = flags[:, :m], flags[:, m:]
    best = (iou * real[:, None, :]).max(-1).values                # [L, B, K]; padding's IoU counts 0
    return query, scores * (best + no_gt)                         # no ground truth: the probability alone


def selection_masks(features: list[Tensor], queries: Tensor, weights: Tensor) -> list[Tensor]:
    """per level feature [B, d, H_j, W_j], queries [L, B, K, d], weights [L, B, K] -> per level psi
    [L, B, H_j, W_j], every layer and level in one pass (on a GPU each operator is a launch).

    psi(h, w) = sum_k s_k cos(q_k, F(:, h, w)), clamped at 0.01 and divided by its per-image maximum over the
    level.
    """
    sizes = [f.shape[-2] * f.shape[-1] for f in features]
    f = F.normalize(join_levels([f.flatten(2) for f in features], 2), dim=1)  # [B, d, P], P = sum_j H_j W_j
    q = F.normalize(queries, dim=-1)                                         # [L, B, K, d]
    psi = torch.einsum("lbk,lbkd,bdp->lbp", weights, q, f).clamp(min=0.01)  # [L, B, P]
    return [(p / p.amax(2, keepdim=True)).view(*p.shape[:2], *feat.shape[-2:])
            for p, feat in zip(psi.split(sizes, 2), features)]


def feature_distillation(student_features: list, teacher_features: list, teacher: DecoderPredictions,
                         targets: list, adapters: nn.ModuleList, cfg: FeatureKDConfig) -> dict:
    """sum over teacher layers t and levels j of mean((psi_t,j * F_T_j - psi_t,j * phi(F_S_j))^2).

    student_features / teacher_features: per level [B, d_S, H_j, W_j] / [B, d_T, H_j, W_j].
    Returns the weighted total 'kd_feature'. Per level, sum_t mean(psi_t^2 (F_T - phi(F_S))^2) is computed
    as mean((sum_t psi_t^2) (F_T - phi(F_S))^2): one squared difference per level, not one per teacher layer;
    and the levels' means as one weighted sum over all their positions.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"feature distillation needs as many feature levels in the student "
                         f"({len(student_features)}) as in the teacher ({len(teacher_features)})")
    adapted = [phi(fs.float()) for phi, fs in zip(adapters, student_features)]  # float32: see float32_losses
    teacher_features = [ft.detach().float() for ft in teacher_features]
    with torch.no_grad():
        probs = teacher.logits.detach().float().sigmoid()         # [L_T, B, N, C]
        query, weight = query_quality(probs, teacher.boxes.detach().float(), targets, cfg.top_k, cfg.quality)
        hidden = teacher.hidden.detach().float()
        q = torch.gather(hidden, 2, query[..., None].expand(-1, -1, -1, hidden.shape[-1]))  # [L_T, B, K, d]
        # sum_t psi_t^2 per level, divided by the level's element count (its mean), then all levels joined
        w = join_levels([(psi ** 2).sum(0).flatten(1) / ft.numel()
                       for psi, ft in zip(selection_masks(teacher_features, q, weight), teacher_features)], 1)
    ft = join_levels([f.flatten(2) for f in teacher_features], 2)           # [B, d_T, P]
    fs = join_levels([f.flatten(2) for f in adapted], 2)                    # [B, d_T, P]
    total = (w[:, None] * (ft - fs) ** 2).sum()
    return {"kd_feature": cfg.weight * total}
