"""SetCriterion's terms against float64 hand computations; aux loss over layers; gradients."""
import math

import pytest
import torch

from trainers.config import LossConfig
from trainers.criterion import SetCriterion
from trainers.models.output import DecoderPredictions

ALPHA, GAMMA = 0.25, 2.0


def focal_by_formula(x, t):
    """One logit x and its {0, 1} target t -> RetinaNet focal loss."""
    p = 1 / (1 + math.exp(-x))
    return -ALPHA * (1 - p) ** GAMMA * math.log(p) if t else -(1 - ALPHA) * p ** GAMMA * math.log(1 - p)


def giou_xyxy(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def xyxy(b):
    return [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]


def num(t):
    return t.detach().item() if torch.is_tensor(t) else float(t)


def tiny_case():
    """2 images, 3 queries, 4 classes; image 0 has 2 targets, image 1 has 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g) * 2
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.3], [0.7, 0.7, 0.3, 0.2]],
                          [[0.2, 0.2, 0.1, 0.1], [0.6, 0.5, 0.4, 0.4], [0.5, 0.5, 0.5, 0.5]]])
    targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.25], [0.3, 0.3, 0.1, 0.2]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.62, 0.45, 0.35, 0.4]])}]
    # known pairs: image 0 query 0 <- target 0, query 1 <- target 1; image 1 query 1 <- target 0
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1])), (torch.tensor([1]), torch.tensor([0]))]
    return logits, boxes, targets, indices


def hand_losses(logits, boxes, targets, indices):
    """The three terms in float64 by plain loops."""
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    cls = l1 = giou = 0.0
    for b, (pred, tgt) in enumerate(indices):
        onehot = [[0] * logits.shape[2] for _ in range(logits.shape[1])]
        for q, t in zip(pred.tolist(), tgt.tolist()):
            onehot[q][int(targets[b]["labels"][t])] = 1
            pb, tb = boxes[b, q].double().tolist(), targets[b]["boxes"][t].double().tolist()
            l1 += sum(abs(x - y) for x, y in zip(pb, tb))
            giou += 1 - giou_xyxy(xyxy(pb), xyxy(tb))
        for q in range(logits.shape[1]):
            for c in range(logits.shape[2]):
                cls += focal_by_formula(float(logits[b, q, c]), onehot[q][c])
    return {"cls": cls / num_boxes, "l1": l1 / num_boxes, "giou": giou / num_boxes}


def test_layer_loss_equals_hand_computation():
    logits, boxes, targets, indices = tiny_case()
    got = SetCriterion(4, LossConfig()).layer_loss(logits, boxes, targets, indices)
    want = hand_losses(logits, boxes, targets, indices)
    assert set(got) == {"cls", "l1", "giou"}
    for k in want:
        assert float(got[k]) == pytest.approx(want[k], rel=1e-5), k


def test_layer_loss_with_other_indices_and_empty_image():
    logits, boxes, targets, _ = tiny_case()
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = [(torch.tensor([2, 0]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.int64),) * 2]
    got = SetCriterion(4).layer_loss(logits, boxes, targets, indices)
    want = hand_losses(logits, boxes, targets, indices)
    for k in want:
        assert float(got[k]) == pytest.approx(want[k], rel=1e-5), k


def test_no_targets_at_all_divides_by_one():
    logits, boxes, _, _ = tiny_case()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    crit = SetCriterion(4)
    out = crit(DecoderPredictions(logits[None], boxes[None], torch.zeros(1, 2, 3, 8)), empty)
    want = sum(focal_by_formula(float(x), 0) for x in logits.flatten())
    assert float(out["loss_cls"]) == pytest.approx(want, rel=1e-5)
    assert float(out["loss_l1"]) == 0 and float(out["loss_giou"]) == 0


def test_aux_loss_sums_layers_and_gradients_are_finite():
    g = torch.Generator().manual_seed(3)
    _, _, targets, _ = tiny_case()
    num_layers = 3
    logits = (torch.randn(num_layers, 2, 3, 4, generator=g) * 2).requires_grad_()
    raw_boxes = torch.randn(num_layers, 2, 3, 4, generator=g).requires_grad_()
    pred = DecoderPredictions(logits, raw_boxes.sigmoid(), torch.zeros(num_layers, 2, 3, 8))
    cfg = LossConfig(cls_weight=2.0, l1_weight=5.0, giou_weight=2.0)
    crit = SetCriterion(4, cfg)
    indices = crit.indices_for(pred, targets)
    out = crit(pred, targets)

    layers = [crit.layer_loss(pred.logits[l], pred.boxes[l], targets, indices[l]) for l in range(num_layers)]
    for l, layer in enumerate(layers):  # the matcher's indices and the hand computation agree per layer
        for k, v in hand_losses(pred.logits[l].detach(), pred.boxes[l].detach(), targets, indices[l]).items():
            assert num(layer[k]) == pytest.approx(v, rel=1e-5)
    total = sum(2.0 * x["cls"] + 5.0 * x["l1"] + 2.0 * x["giou"] for x in layers)
    assert num(out["loss"]) == pytest.approx(num(total), rel=1e-6)
    for k in ("cls", "l1", "giou"):
        assert num(out[f"loss_{k}"]) == pytest.approx(num(sum(x[k] for x in layers)), rel=1e-6)
        assert num(out[f"loss_{k}_last"]) == pytest.approx(num(layers[-1][k]), rel=1e-6)

    out["loss"].backward()
    for grad in (logits.grad, raw_boxes.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    for l in range(num_layers):  # box terms reach matched queries only
        unmatched = sorted(set(range(3)) - set(indices[l][1][0].tolist()))
        assert raw_boxes.grad[l, 1, unmatched].abs().sum() == 0


def test_forward_with_given_indices_uses_them():
    logits, boxes, targets, indices = tiny_case()
    pred = DecoderPredictions(torch.stack([logits, logits]), torch.stack([boxes, boxes]), torch.zeros(2, 2, 3, 8))
    crit = SetCriterion(4)
    out = crit(pred, targets, indices=[indices, indices])
    want = hand_losses(logits, boxes, targets, indices)
    assert float(out["loss_l1"]) == pytest.approx(2 * want["l1"], rel=1e-5)
    with pytest.raises(ValueError, match="layers"):
        crit(pred, targets, indices=[indices])


def _boxes(n, seed):
    """[n, 4] cxcywh in float64, disjoint, overlapping and nested pairs alike."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(n, 2, generator=g) * 0.8 + 0.1, torch.rand(n, 2, generator=g) * 0.5 + 0.02], 1).double()


def test_elementwise_giou_values_and_gradients_against_references():
    """The hand-written GIoU (box_ops._ElementwiseGIoU): values against the plain float64 formula, gradients
    w.r.t. both boxes against finite differences (gradcheck) and against autograd through the plain formula."""
    from trainers.box_ops import elementwise_giou
    a = _boxes(200, 0)
    b = torch.cat([_boxes(100, 1), a[100:] + 0.05 * (torch.rand(100, 4, dtype=torch.float64) - 0.5)])  # half near a
    a, b = a.requires_grad_(), b.requires_grad_()
    got = elementwise_giou(a, b)
    want = torch.tensor([giou_xyxy(xyxy(p), xyxy(q)) for p, q in zip(a.tolist(), b.tolist())], dtype=torch.float64)
    assert (got - want).abs().max().item() < 1e-12
    assert (want < 0).any() and (want > 0.3).any()  # disjoint and overlapping pairs both present

    def plain(a, b):  # the formula through autograd
        a0, a1 = a[:, :2] - a[:, 2:] / 2, a[:, :2] + a[:, 2:] / 2
        b0, b1 = b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2
        inter = (torch.min(a1, b1) - torch.max(a0, b0)).clamp(min=0).prod(1)
        union = (a1 - a0).prod(1) + (b1 - b0).prod(1) - inter
        hull = (torch.max(a1, b1) - torch.min(a0, b0)).prod(1)
        return inter / union - (hull - union) / hull
    weights = torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = torch.autograd.grad((elementwise_giou(a, b) * weights).sum(), (a, b))
    ref = torch.autograd.grad((plain(a, b) * weights).sum(), (a, b))
    assert all((x - y).abs().max().item() < 1e-12 for x, y in zip(ours, ref))
    assert torch.autograd.gradcheck(elementwise_giou, (a[:20].detach().requires_grad_(), b[:20].detach().requires_grad_()))
    # a constant second argument (ground truth, a detached teacher) gets no gradient computed
    only_a = _boxes(5, 3).requires_grad_()
    elementwise_giou(only_a, _boxes(5, 4)).sum().backward()
    assert only_a.grad is not None and torch.isfinite(only_a.grad).all()


def test_elementwise_giou_of_a_box_with_itself_is_one_with_a_zero_gradient():
    """Every edge ties there; GIoU is at its maximum, and autograd's split of tied edges gives zero."""
    from trainers.box_ops import elementwise_giou
    a = _boxes(10, 5).requires_grad_()
    giou = elementwise_giou(a, a.detach())
    giou.sum().backward()
    assert torch.allclose(giou, torch.ones_like(giou)) and a.grad.abs().max().item() < 1e-12


def test_pairwise_iou_and_giou_against_the_formula_and_the_elementwise_giou():
    """batched_pairwise_{iou,giou} over leading dims: every pair against the float64 formula; the pairs on the
    diagonal bitwise equal to elementwise_giou of the same boxes in float32 (the matching cost and the loss
    agree on what a box pair's GIoU is)."""
    from trainers.box_ops import batched_pairwise_giou, batched_pairwise_iou, elementwise_giou
    a, b = _boxes(2 * 3 * 7, 6).view(2, 3, 7, 4), _boxes(3 * 5, 7).view(3, 5, 4)  # b broadcast over a's dim 0
    giou, iou = batched_pairwise_giou(a, b), batched_pairwise_iou(a, b)
    assert giou.shape == iou.shape == (2, 3, 7, 5)
    for g in range(2):
        for i in range(3):
            for n in range(7):
                for m in range(5):
                    p, q = xyxy(a[g, i, n].tolist()), xyxy(b[i, m].tolist())
                    assert abs(giou[g, i, n, m].item() - giou_xyxy(p, q)) < 1e-12
                    inter = max(0.0, min(p[2], q[2]) - max(p[0], q[0])) * max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
                    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
                    assert abs(iou[g, i, n, m].item() - inter / union) < 1e-12
    assert (giou < 0).any() and (iou == 0).any() and (iou > 0.2).any()
    x, y = _boxes(50, 8).float(), _boxes(50, 9).float()
    assert torch.equal(batched_pairwise_giou(x, y).diagonal(), elementwise_giou(x, y))


def test_weighted_sum_equals_the_sum_of_products_with_their_gradient():
    """weighted_sum (a dot product with the weights copied to the device once) against the plain sum, values
    and gradient; the weights' tensor is made once per values and reused."""
    from trainers.criterion import weighted_sum
    from trainers.models.constants import cached_device_constant
    values = torch.tensor([0.5, -2.0, 3.25], dtype=torch.float64, requires_grad=True)
    total = weighted_sum(values, [2.0, 5.0, 0.5])
    assert total.item() == 2.0 * 0.5 + 5.0 * -2.0 + 0.5 * 3.25
    total.backward()
    assert values.grad.tolist() == [2.0, 5.0, 0.5]
    assert cached_device_constant((2.0, 5.0, 0.5), values) is cached_device_constant((2.0, 5.0, 0.5), values)
    assert cached_device_constant((2.0, 5.0, 0.5), values.float()).dtype == torch.float32
