"""Box conversions and pairwise IoU / GIoU. Boxes are (cx, cy, w, h) or (x0, y0, x1, y1)."""
import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1). (Whole (x, y) pairs at once: on a GPU, each
    operator is a kernel launch, and box arithmetic runs many times a step.)"""
    center, half = boxes[..., :2], 0.5 * boxes[..., 2:]
    return torch.cat([center - half, center + half], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    low, high = boxes[..., :2], boxes[..., 2:]
    return torch.cat([(low + high) / 2, high - low], dim=-1)


def elementwise_giou(a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
    """[K, 4], [K, 4] cxcywh -> [K] generalized IoU of corresponding boxes (no K x K matrix)."""
    a, b = cxcywh_to_xyxy(a_cxcywh), cxcywh_to_xyxy(b_cxcywh)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _batched_overlap(a_cxcywh: Tensor, b_cxcywh: Tensor):
    """[..., N, 4], [..., M, 4] cxcywh -> (a, b) broadcast xyxy, intersection and union [..., N, M]."""
    a, b = cxcywh_to_xyxy(a_cxcywh)[..., :, None, :], cxcywh_to_xyxy(b_cxcywh)[..., None, :, :]
    area_a = (a[..., 2:] - a[..., :2]).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).prod(-1)
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return a, b, inter, area_a + area_b - inter


def batched_pairwise_iou(a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
    """[..., N, 4], [..., M, 4] cxcywh -> [..., N, M] IoU, batched over (broadcast) leading dims."""
    _, _, inter, union = _batched_overlap(a_cxcywh, b_cxcywh)
    return inter / union


def batched_pairwise_giou(a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
    """[..., N, 4], [..., M, 4] cxcywh -> [..., N, M] generalized IoU, batched over leading dims."""
    a, b, inter, union = _batched_overlap(a_cxcywh, b_cxcywh)
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return inter / union - (hull - union) / hull


def clamp_cxcywh(boxes: Tensor) -> Tensor:
    """Clip cxcywh boxes to the unit image."""
    return xyxy_to_cxcywh(cxcywh_to_xyxy(boxes).clamp(0, 1))
