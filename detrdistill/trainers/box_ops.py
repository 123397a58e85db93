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


def _area(wh: Tensor) -> Tensor:
    """[..., 2] (width, height) -> [...] their product. Not `.prod(-1)`, whose backward takes ~10 operators
    (cumulative products, flips) where a product's takes two: GIoU runs in every loss term of a step."""
    return wh[..., 0] * wh[..., 1]


def elementwise_giou(a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
    """[K, 4], [K, 4] cxcywh -> [K] generalized IoU of corresponding boxes (no K x K matrix)."""
    a, b = cxcywh_to_xyxy(a_cxcywh), cxcywh_to_xyxy(b_cxcywh)
    area_a = _area(a[:, 2:] - a[:, :2])
    area_b = _area(b[:, 2:] - b[:, :2])
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = _area((rb - lt).clamp(min=0))
    union = area_a + area_b - inter
    iou = inter / union
    hull = _area((torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0))
    return iou - (hull - union) / hull


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _batched_overlap(a_cxcywh: Tensor, b_cxcywh: Tensor):
    """[..., N, 4], [..., M, 4] cxcywh -> (a, b) broadcast xyxy, intersection and union [..., N, M]."""
    a, b = cxcywh_to_xyxy(a_cxcywh)[..., :, None, :], cxcywh_to_xyxy(b_cxcywh)[..., None, :, :]
    area_a = _area(a[..., 2:] - a[..., :2])
    area_b = _area(b[..., 2:] - b[..., :2])
    inter = _area((torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0))
    return a, b, inter, area_a + area_b - inter


def batched_pairwise_iou(a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
    """[..., N, 4], [..., M, 4] cxcywh -> [..., N, M] IoU, batched over (broadcast) leading dims."""
    _, _, inter, union = _batched_overlap(a_cxcywh, b_cxcywh)
    return inter / union


def batched_pairwise_giou(a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
    """[..., N, 4], [..., M, 4] cxcywh -> [..., N, M] generalized IoU, batched over leading dims."""
    a, b, inter, union = _batched_overlap(a_cxcywh, b_cxcywh)
    hull = _area((torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0))
    return inter / union - (hull - union) / hull


def clamp_cxcywh(boxes: Tensor) -> Tensor:
    """Clip cxcywh boxes to the unit image."""
    return xyxy_to_cxcywh(cxcywh_to_xyxy(boxes).clamp(0, 1))
