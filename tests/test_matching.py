"""HungarianMatcher against brute force over all assignments; solve_assignments' contract."""
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from trainers.matching import HungarianMatcher, solve_assignments
from trainers.models.output import DecoderPredictions

W_CLS, W_L1, W_GIOU, ALPHA, GAMMA = 2.0, 5.0, 2.0, 0.25, 2.0


def random_boxes(g, *shape):
    """Normalized cxcywh boxes well inside the image."""
    centre = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
    size = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 0.35 + 0.05
    return torch.cat([centre, size], -1)


def make_targets(g, sizes, num_classes):
    return [{"labels": torch.randint(num_classes, (m,), generator=g), "boxes": random_boxes(g, m).float()}
            for m in sizes]


def giou_by_hand(a, b):
    """Two cxcywh boxes (sequences of 4 floats) -> GIoU, in plain float64 arithmetic."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def reference_cost(logits, boxes, target):
    """One image's [N, M] matching cost in float64, written from the formula."""
    logits, boxes = logits.double().numpy(), boxes.double().numpy()
    labels, tboxes = target["labels"].numpy(), target["boxes"].double().numpy()
    cost = np.zeros((len(logits), len(labels)))
    for n in range(len(logits)):
        for m in range(len(labels)):
            p = 1 / (1 + np.exp(-logits[n, labels[m]]))
            focal = ALPHA * (1 - p) ** GAMMA * -np.log(p) - (1 - ALPHA) * p ** GAMMA * -np.log(1 - p)
            l1 = np.abs(boxes[n] - tboxes[m]).sum()
            cost[n, m] = W_CLS * focal + W_L1 * l1 - W_GIOU * giou_by_hand(boxes[n], tboxes[m])
    return cost


def brute_force_min(cost):
    """Minimum total cost over all injections of the smaller side into the larger one."""
    n, m = cost.shape
    if n == 0 or m == 0:
        return 0.0
    if n >= m:  # choose which query takes each target
        return min(sum(cost[q, t] for t, q in enumerate(qs)) for qs in itertools.permutations(range(n), m))
    return min(sum(cost[q, t] for q, t in enumerate(ts)) for ts in itertools.permutations(range(m), n))


def check_valid(pred, tgt, n, m):
    assert pred.dtype == torch.int64 and tgt.dtype == torch.int64
    assert len(pred) == len(tgt) == min(n, m)
    assert len(set(pred.tolist())) == len(pred) and len(set(tgt.tolist())) == len(tgt)
    assert all(0 <= q < n for q in pred.tolist()) and all(0 <= t < m for t in tgt.tolist())


@pytest.mark.parametrize("num_queries,sizes", [(5, [3, 0, 5, 1]), (3, [5, 4, 2, 0]), (4, [4, 4]), (0, [2, 0])])
def test_matcher_equals_brute_force(num_queries, sizes):
    g = torch.Generator().manual_seed(num_queries * 10 + len(sizes))
    c = 6
    targets = make_targets(g, sizes, c)
    logits = torch.randn(len(sizes), num_queries, c, generator=g, dtype=torch.float64).float() * 3
    boxes = random_boxes(g, len(sizes), num_queries).float()
    indices = HungarianMatcher(W_CLS, W_L1, W_GIOU, ALPHA, GAMMA)(logits, boxes, targets)
    assert len(indices) == len(sizes)
    for b, (pred, tgt) in enumerate(indices):
        check_valid(pred, tgt, num_queries, sizes[b])
        cost = reference_cost(logits[b], boxes[b], targets[b])
        found = cost[pred.numpy(), tgt.numpy()].sum()
        assert found == pytest.approx(brute_force_min(cost), abs=1e-4)


def test_match_layers_equals_per_layer_calls():
    g = torch.Generator().manual_seed(0)
    l, b, n, c = 3, 3, 6, 5
    targets = make_targets(g, [2, 0, 4], c)
    pred = DecoderPredictions(torch.randn(l, b, n, c, generator=g), random_boxes(g, l, b, n).float(),
                              torch.zeros(l, b, n, 8))
    matcher = HungarianMatcher()
    per_layer = matcher.match_layers(pred, targets)
    assert len(per_layer) == l
    for layer in range(l):
        single = matcher(pred.logits[layer], pred.boxes[layer], targets)
        for (p1, t1), (p2, t2) in zip(per_layer[layer], single):
            assert torch.equal(p1, p2) and torch.equal(t1, t2)


def test_matcher_all_targets_empty():
    g = torch.Generator().manual_seed(1)
    indices = HungarianMatcher()(torch.randn(2, 4, 3, generator=g), random_boxes(g, 2, 4).float(),
                                 make_targets(g, [0, 0], 3))
    assert all(len(p) == len(t) == 0 for p, t in indices)


def test_solve_assignments_matches_scipy_and_handles_empty():
    rng = np.random.default_rng(0)
    costs = [rng.normal(size=(4, 6)), rng.normal(size=(6, 4)), np.zeros((0, 3)), np.zeros((3, 0)),
             rng.normal(size=(1, 1)).astype(np.float32)]
    for cost, (rows, cols) in zip(costs, solve_assignments(costs)):
        assert rows.dtype == np.int64 and cols.dtype == np.int64
        if cost.size == 0:
            assert len(rows) == len(cols) == 0
            continue
        r, c = linear_sum_assignment(cost)
        assert cost[rows, cols].sum() == pytest.approx(cost[r, c].sum())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_solve_assignments_rejects_non_finite(bad):
    cost = np.ones((3, 3))
    cost[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        solve_assignments([np.ones((2, 2)), cost])


def test_cost_matrix_equals_formula():
    from trainers.matching import pad_targets
    g = torch.Generator().manual_seed(2)
    targets = make_targets(g, [3, 1], 4)
    logits, boxes = torch.randn(2, 5, 4, generator=g) * 4, random_boxes(g, 2, 5).float()
    labels, tboxes, sizes = pad_targets(targets, "cpu")
    cost = HungarianMatcher().cost(logits, boxes, labels, tboxes)
    assert cost.shape == (2, 5, 3) and cost.dtype == torch.float32
    for b in range(2):
        ref = reference_cost(logits[b], boxes[b], targets[b])
        np.testing.assert_allclose(cost[b, :, :sizes[b]].double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_pad_targets_pads_once_per_batch_and_again_when_the_targets_change():
    """A step's three paddings of one batch are one (the same tensors back); other target tensors, or the same
    ones modified in place, are padded anew, with their values."""
    from trainers.matching import pad_targets
    targets = [{"labels": torch.tensor([3, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    labels, boxes, sizes = first = pad_targets(targets, "cpu")
    assert sizes == [2, 0] and labels.tolist() == [[3, 1], [0, 0]]
    assert boxes[1].tolist() == [[0.5, 0.5, 1.0, 1.0]] * 2 and torch.equal(boxes[0], targets[0]["boxes"])
    again = pad_targets(targets, "cpu")
    assert all(x is y for x, y in zip(again, first))
    copied = [{k: v.clone() for k, v in t.items()} for t in targets]  # equal values, other tensors
    assert pad_targets(copied, "cpu")[0] is not labels and torch.equal(pad_targets(copied, "cpu")[0], labels)
    assert pad_targets(targets, "cpu")[1][0, 0, 0].item() == 0.5
    targets[0]["boxes"][0, 0] = 0.25  # in place: a new version of the same tensor
    assert pad_targets(targets, "cpu")[1][0, 0, 0].item() == 0.25
