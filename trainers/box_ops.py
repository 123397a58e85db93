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


def _extents(cxcywh: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (-x0, -y0, x1, y1). With the low corner negated, an intersection is
    one elementwise minimum of two boxes' extents and a hull one maximum, and a side is a sum of two."""
    center, half = cxcywh[..., :2], 0.5 * cxcywh[..., 2:]
    return torch.cat([half - center, center + half], -1)


def _sides(extents: Tensor) -> Tensor:
    """[..., 4] extents -> [..., 2] (width, height)."""
    return extents[..., :2] + extents[..., 2:]


class _ElementwiseGIoU(torch.autograd.Function):
    """GIoU of corresponding boxes with a hand-written backward: ~60 operators forward and backward where
    autograd's graph of the same formula takes ~110, and on a GPU each is a kernel launch (every set loss,
    KD term and query-prior loss of a step runs one). Values and gradients are those of the formula
    (x0 = cx - w / 2, ...) through autograd, ties included: where two boxes share an edge, its gradient is
    split between them as autograd's minimum / maximum do (so a box compared with itself gets zero)."""

    @staticmethod
    def forward(ctx, a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
        ea, eb = _extents(torch.stack([a_cxcywh, b_cxcywh])).unbind(0)  # both boxes' extents in one pass
        # intersection's, hull's and both boxes' extents [4, K, 4]; their sides [4, K, 2]. A box's own sides
        # are >= 0 (sigmoid outputs, ground truth without degenerate boxes), so one clamp serves all four
        raw = torch.stack([torch.minimum(ea, eb), torch.maximum(ea, eb), ea, eb])
        raw = raw[..., :2] + raw[..., 2:]
        sides = raw.clamp(min=0)
        inter, hull, area_a, area_b = (sides[..., 0] * sides[..., 1]).unbind(0)
        union = area_a + area_b - inter
        ctx.save_for_backward(ea, eb, sides, raw[:2] >= 0, inter, hull, union)
        return inter / union - (hull - union) / hull

    @staticmethod
    def backward(ctx, grad: Tensor):
        """giou = I/U - 1 + U/H with U = A_a + A_b - I: dI = 1/U + I/U^2 - 1/H, dA = 1/H - I/U^2, dH = -U/H^2;
        each area's sides get the other side times its gradient; clamped sides pass where >= 0 (as
        clamp's own backward); an extent's share of the intersection's edge is 1 where it is the inner one,
        1/2 at a tie, else 0, and the rest of the hull's."""
        ea, eb, sides, unclamped, inter, hull, union = ctx.saved_tensors
        inv_union, inv_hull = union.reciprocal(), hull.reciprocal()
        iou_term = inter * inv_union * inv_union
        d_area = grad * (inv_hull - iou_term)
        d = torch.stack([grad * (inv_union + iou_term - inv_hull), -grad * union * inv_hull * inv_hull, d_area,
                         d_area])[..., None] * sides.flip(-1)  # [4, K, 2]: inter, hull, area a, area b
        d_inner, d_outer = (d[:2] * unclamped).repeat(1, 1, 2).unbind(0)  # [K, 4] each: side = sum of 2 extents
        a_share = 0.5 * (1 + torch.sign(eb - ea))  # a's share of the inner edge; b's of the outer one
        d_split = (d_inner - d_outer) * a_share
        d_a = _extents_backward(d_outer + d_split + d[2].repeat(1, 2)) if ctx.needs_input_grad[0] else None
        d_b = _extents_backward(d_inner - d_split + d[3].repeat(1, 2)) if ctx.needs_input_grad[1] else None
        return d_a, d_b


def _extents_backward(d: Tensor) -> Tensor:
    """Gradient w.r.t. (cx, cy, w, h) of one w.r.t. `_extents`' (-x0, -y0, x1, y1)."""
    return torch.cat([d[:, 2:] - d[:, :2], 0.5 * (d[:, :2] + d[:, 2:])], 1)


def elementwise_giou(a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
    """[K, 4], [K, 4] cxcywh -> [K] generalized IoU of corresponding boxes (no K x K matrix)."""
    return _ElementwiseGIoU.apply(a_cxcywh, b_cxcywh)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _batched_overlap(a_cxcywh: Tensor, b_cxcywh: Tensor, hull: bool = False):
    """[..., N, 4], [..., M, 4] cxcywh -> intersection and union [..., N, M], and with `hull` the hull's area
    [..., N, M] (else None). Sides from extents, as `elementwise_giou`: the same values pair by pair."""
    ea, eb = _extents(a_cxcywh), _extents(b_cxcywh)
    area_a, area_b = _area(_sides(ea)), _area(_sides(eb))                  # [..., N], [..., M]
    ea, eb = ea[..., :, None, :], eb[..., None, :, :]
    inner = torch.minimum(ea, eb)                                          # [..., N, M, 4]
    if hull:  # the intersection's and the hull's sides in one pass (an empty intersection's are negative)
        inter, outer = _area(_sides(torch.stack([inner, torch.maximum(ea, eb)])).clamp(min=0)).unbind(0)
    else:
        inter, outer = _area(_sides(inner).clamp(min=0)), None
    return inter, area_a[..., :, None] + area_b[..., None, :] - inter, outer


def batched_pairwise_iou(a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
    """[..., N, 4], [..., M, 4] cxcywh -> [..., N, M] IoU, batched over (broadcast) leading dims."""
    inter, union, _ = _batched_overlap(a_cxcywh, b_cxcywh)
    return inter / union


def batched_pairwise_giou(a_cxcywh: Tensor, b_cxcywh: Tensor) -> Tensor:
    """[..., N, 4], [..., M, 4] cxcywh -> [..., N, M] generalized IoU, batched over leading dims."""
    inter, union, hull = _batched_overlap(a_cxcywh, b_cxcywh, hull=True)
    return inter / union - (hull - union) / hull


def clamp_cxcywh(boxes: Tensor) -> Tensor:
    """Clip cxcywh boxes to the unit image."""
    return xyxy_to_cxcywh(cxcywh_to_xyxy(boxes).clamp(0, 1))
