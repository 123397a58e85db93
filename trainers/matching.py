"""Hungarian matching of predictions to ground truth, for every image and decoder layer of a batch.

The costs are computed in one batched tensor op (targets padded to the batch's largest M), moved to the CPU
once, and every resulting cost matrix goes through `solve_assignments`: it is the single place that solves
linear sum assignments, and it solves a step's problems in parallel (`lsap`: scipy's algorithm compiled
with numba, on several threads), with exactly scipy's results. On a GPU the copy to the host does not make
the host wait: `accel.start_on_host` solves on a helper thread once the costs land, while the caller goes on
queueing GPU work, and the caller collects the assignment when it needs it.

Shapes: L decoder layers, B images, N queries, C classes, M targets of an image.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from trainers import lsap
from trainers.accel import start_on_host
from trainers.box_ops import batched_pairwise_giou
from trainers.models.constants import host_to_device
from trainers.models.output import DecoderPredictions

Indices = list[tuple[Tensor, Tensor]]  # per image: (pred_idx int64 [K], tgt_idx int64 [K]), K = min(N, M)


# Below this much work (sum over problems of R * C * min(R, C); 60^3 = one 60 x 60 problem) the serial
# scipy loop is quick and used as is, sparing small-only processes the numba import and cache load; above
# it lsap wins, even on one thread (benchmarks/matching.py measures both).
PARALLEL_MIN_WORK = 200_000


def solve_assignments(costs: list[np.ndarray], num_threads: int | None = None,
                      backend: str = "auto") -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact minimum-cost rectangular assignment of each independent cost matrix [R_i, C_i].

    Returns per matrix (row_idx, col_idx), int64 [min(R_i, C_i)], rows ascending. Empty matrices (R_i or
    C_i == 0) give empty assignments. Non-finite costs are refused: scipy would fail or return garbage,
    and a NaN cost almost always means a NaN prediction upstream, which should surface here loudly.

    backend "auto": the parallel solver of `lsap` (scipy's algorithm compiled with numba, the problems
    spread over `num_threads` threads, default torch.get_num_threads()) when numba is installed and the
    batch is big enough to gain from it, else scipy one matrix after the other. Both give exactly
    scipy's result; "scipy" / "numba" force one.
    """
    costs = [np.asarray(cost) for cost in costs]
    for i, cost in enumerate(costs):
        if cost.ndim != 2:
            raise ValueError(f"cost matrix {i} must be 2-D, got shape {cost.shape}")
    if backend not in ("auto", "scipy", "numba"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "auto":
        work = sum(c.shape[0] * c.shape[1] * min(c.shape) for c in costs)
        backend = "numba" if work >= PARALLEL_MIN_WORK and lsap.available() else "scipy"
    if backend == "numba":
        threads = torch.get_num_threads() if num_threads is None else num_threads
        out = lsap.solve_many(costs, threads)
        for i, solved in enumerate(out):
            if solved is None:
                raise _non_finite(i, costs[i])
        return out
    out = []
    for i, cost in enumerate(costs):
        if cost.size == 0:
            out.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
            continue
        if not np.isfinite(cost).all():
            raise _non_finite(i, cost)
        rows, cols = linear_sum_assignment(cost)
        out.append((rows.astype(np.int64), cols.astype(np.int64)))
    return out


class NonFiniteCostError(ValueError):
    """A cost matrix holds NaN or inf: the predictions it was built from diverged."""


def _non_finite(i: int, cost: np.ndarray) -> ValueError:
    return NonFiniteCostError(f"cost matrix {i} (shape {cost.shape}) contains NaN or inf; "
                      "check the predictions for NaN (diverged training, degenerate boxes)")


def pad_targets(targets: list[dict], device) -> tuple[Tensor, Tensor, list[int]]:
    """targets -> labels int64 [B, M_max], boxes [B, M_max, 4], the true M of each image.

    Padding uses label 0 and the full-image box, so padded columns have finite costs; they are cut off
    before solving. The last call's result is reused for the very same target tensors, unmodified: a
    distillation step pads one batch's targets three times (the student's and the teacher's assignment, the
    feature mask's quality), each time a handful of launches on a GPU.
    """
    key = ([(t["labels"], t["labels"]._version, t["boxes"], t["boxes"]._version) for t in targets],
           torch.device(device))
    if _last_padded and _same_key(_last_padded[0], key):
        return _last_padded[1]
    sizes = [len(t["labels"]) for t in targets]
    m = max(sizes, default=0)
    labels = torch.zeros(len(targets), m, dtype=torch.int64, device=device)
    boxes = host_to_device(torch.tensor([0.5, 0.5, 1.0, 1.0]), device).repeat(len(targets), m, 1)
    for b, t in enumerate(targets):
        labels[b, :sizes[b]] = t["labels"].to(device)
        boxes[b, :sizes[b]] = t["boxes"].to(device, torch.float32)
    _last_padded[:] = [key, (labels, boxes, sizes)]
    return labels, boxes, sizes


_last_padded: list = []  # [key, result] of pad_targets' last call


def _same_key(old, new) -> bool:
    """The same target tensors (identity, not values: a step's own batch), at the same versions and device."""
    (old_tensors, old_device), (new_tensors, new_device) = old, new
    return old_device == new_device and len(old_tensors) == len(new_tensors) and all(
        a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3] for a, b in zip(old_tensors, new_tensors))


class HungarianMatcher:
    """One-to-one assignment of queries to ground-truth boxes (Deformable DETR's matcher).

    cost[n, m] = cost_class * focal(p[n, label_m]) + cost_bbox * |b_n - b_m|_1 - cost_giou * GIoU(b_n, b_m)
    with focal(p) = alpha (1-p)^g (-log p) - (1-alpha) p^g (-log(1-p)): the focal loss's change when the
    query's target at that class goes from 0 to 1.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """logits [..., B, N, C], boxes [..., B, N, 4], labels [B, M], tgt_boxes [B, M, 4] -> [..., B, N, M].

        Float32 whatever the input dtype: bf16 costs would make near-ties random.
        """
        boxes = boxes.float()
        if labels.shape[-1] == 0:  # no ground truth in the batch: nothing to match (and no kernels to run)
            return boxes.new_zeros(*boxes.shape[:-1], 0)
        index = labels[:, None, :].expand(*logits.shape[:-1], labels.shape[-1])  # [..., B, N, M]
        x = logits.float().gather(-1, index)  # each query's logit at each target's class
        p = x.sigmoid()
        # -log(1-p) = softplus(x) and -log p = softplus(x) - x, stable for large |x| unlike log(p + eps); the
        # class weight folded into the constants (on a GPU every operator here is a launch, at every step)
        soft = F.softplus(x)
        pos = (self.cost_class * self.alpha) * (1 - p) ** self.gamma * (soft - x)
        neg = (self.cost_class * (1 - self.alpha)) * p ** self.gamma * soft
        l1 = torch.cdist(boxes, tgt_boxes.expand(*boxes.shape[:-2], *tgt_boxes.shape[-2:]), p=1)
        cost = torch.add(pos - neg, l1, alpha=self.cost_bbox)
        return torch.sub(cost, batched_pairwise_giou(boxes, tgt_boxes), alpha=self.cost_giou)

    @torch.no_grad()
    def start(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> Callable[[], list[Indices]]:
        """logits [G, B, N, C], boxes [G, B, N, 4] (G independent groups, e.g. layers) -> `wait()` -> [G][B]
        indices. The costs are queued now and copied to the host in one copy (`accel.start_on_host`)."""
        labels, tgt_boxes, sizes = pad_targets(targets, logits.device)
        return start_on_host(partial(_solve_padded, sizes=sizes), self.cost(logits, boxes, labels, tgt_boxes))

    def __call__(self, logits: Tensor, boxes: Tensor, targets: list[dict]) -> Indices:
        """logits [B, N, C], boxes [B, N, 4] normalized cxcywh -> per image (pred_idx [K], tgt_idx [K])."""
        return self.start(logits[None], boxes[None], targets)()[0]

    def match_layers(self, predictions: DecoderPredictions, targets: list[dict]) -> list[Indices]:
        """Every decoder layer at once: [L][B] (pred_idx, tgt_idx), all L*B problems in one solve."""
        return self.start(predictions.logits, predictions.boxes, targets)()


def _solve_padded(cost: Tensor, sizes: list[int]) -> list[Indices]:
    """Host costs [G, B, N, M_max] (targets padded) -> [G][B] indices, each image's padding cut off."""
    cost = cost.numpy()
    g, b = cost.shape[:2]
    solved = solve_assignments([cost[i, j, :, :sizes[j]] for i in range(g) for j in range(b)])
    solved = [(torch.from_numpy(r), torch.from_numpy(c)) for r, c in solved]
    return [solved[i * b:(i + 1) * b] for i in range(g)]
