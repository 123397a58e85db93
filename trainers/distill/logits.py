"""Hungarian-matching logits distillation (docs/method.md).

DETR predictions are an unordered set, so student and teacher predictions are first matched one-to-one with
the Hungarian algorithm (cost: soft BCE summed over classes + L1 - GIoU), then matched pairs are distilled.
All layer pairs and images of a step are matched in one call of `solve_assignments`; on a GPU that solve
runs on a helper thread while the host queues the rest of the step (`KDMatching`).
"""
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.accel import start_on_host
from trainers.box_ops import batched_pairwise_giou, clamp_cxcywh, elementwise_giou
from trainers.config import LogitsKDConfig
from trainers.criterion import flat_matches, weighted_sum
from trainers.matching import solve_assignments
from trainers.models.constants import host_to_device
from trainers.models.output import DecoderPredictions


def kd_cost(student_logits: Tensor, student_boxes: Tensor, teacher_probs: Tensor, teacher_boxes: Tensor,
            cfg: LogitsKDConfig) -> Tensor:
    """[P, B, N_S, C], [P, B, N_S, 4], [P, B, N_T, C], [P, B, N_T, 4] -> cost [P, B, N_S, N_T].

    sum_c BCE(x, p) = sum_c softplus(x) - x . p, so the class cost of all pairs is one batched matmul, with
    the softplus sums and the class weight in the same operator (baddbmm).
    """
    x, p = student_logits.float(), teacher_probs.float()
    lead, (n_s, c), n_t = x.shape[:-2], x.shape[-2:], p.shape[-2]
    cls = torch.baddbmm(F.softplus(x).sum(-1, keepdim=True).view(-1, n_s, 1), x.reshape(-1, n_s, c),
                        p.reshape(-1, n_t, c).transpose(1, 2), beta=cfg.cost_cls, alpha=-cfg.cost_cls)
    cost = torch.add(cls.view(*lead, n_s, n_t), torch.cdist(student_boxes.float(), teacher_boxes.float(), p=1),
                     alpha=cfg.cost_l1)
    return torch.sub(cost, batched_pairwise_giou(student_boxes.float(), teacher_boxes.float()), alpha=cfg.cost_giou)


def match_to_teacher(cost: Tensor, student_valid: Tensor = None, teacher_valid: Tensor = None) -> Callable[[], list]:
    """cost [P, B, N_S, N_T] -> `wait()` -> per (pair, image) (student_idx, teacher_idx) int64 tensors on the
    CPU (`flat_matches` moves a whole step's indices to the device in one copy); see `accel.start_on_host`.

    Optional masks [P, B, N_S] / [P, B, N_T] restrict which predictions take part (positive/negative split).
    """
    return start_on_host(_solve, cost.detach(), student_valid, teacher_valid)


def _solve(cost: Tensor, student_valid, teacher_valid) -> list:
    """On host tensors (or arrays): the assignments of every (pair, image), restricted to the valid rows /
    columns. numpy from the host copy on (views of it, one selection per mask), torch only to wrap the
    results: on a GPU this runs on the helper thread, beside the step's thread and its operators."""
    P, B = cost.shape[:2]
    costs = np.asarray(cost).reshape(P * B, *cost.shape[2:])
    rows_kept = _kept(student_valid, P * B)
    cols_kept = _kept(teacher_valid, P * B)
    problems = []
    for c, rows, cols in zip(costs, rows_kept, cols_kept):
        c = c if rows is None else c[rows]
        problems.append(c if cols is None else c[:, cols])
    out = []
    for (r, c), rows, cols in zip(solve_assignments(problems), rows_kept, cols_kept):
        out.append((torch.from_numpy(r if rows is None else rows[r]), torch.from_numpy(c if cols is None else cols[c])))
    return out


def _kept(valid, problems: int) -> list:
    """Mask [P, B, N] (tensor or array) -> per (pair, image) the int64 indices of its valid entries; None: all."""
    if valid is None:
        return [None] * problems
    return [np.flatnonzero(v).astype(np.int64) for v in np.asarray(valid).reshape(problems, -1)]


def _solve_split(cost: Tensor, positive: Tensor) -> tuple[list, list]:
    """positive/negative split: confident teacher predictions matched first; then the rest of the teacher's
    among the student predictions left over."""
    positive = np.asarray(positive)
    pos_matches = _solve(cost, None, positive)
    B = cost.shape[1]
    student_free = np.ones(cost.shape[:3], dtype=bool)
    for k, (s, _) in enumerate(pos_matches):
        student_free[k // B, k % B, s.numpy()] = False
    return pos_matches, _solve(cost, student_free, ~positive)


def _pairwise_loss(x, bs, p, bt, matches, background: bool = False) -> Tensor:
    """x [P, B, N_S, C], bs [P, B, N_S, 4], p [P, B, N_T, C], bt [P, B, N_T, 4]; matches ordered (pair, image)
    -> the terms (class, L1, GIoU) [3]. Each term: per layer pair, summed over its matched pairs (and classes /
    coordinates) and divided by their number; then summed over layer pairs. All pairs in one batched
    computation: each match weighted by 1 / its layer pair's match count (from the host's indices:
    torch.bincount on a GPU reads its input's min and max back to the host, a wait for every kernel queued
    before it), then one sum."""
    P, B = x.shape[:2]
    per_pair = [matches[k * B:(k + 1) * B] for k in range(P)]
    pair, image, s, t = flat_matches(per_pair, B, x.device)
    counts = [sum(len(rows) for rows, _ in pair_matches) for pair_matches in per_pair]
    weight = np.repeat(1 / np.maximum(counts, 1), counts).astype(np.float32)[:, None]       # [K, 1]
    weight = host_to_device(torch.from_numpy(weight), x.device)
    xs, bss, ps, bts = x[pair, image, s].float(), bs[pair, image, s].float(), p[pair, image, t], bt[pair, image, t]
    target = torch.zeros_like(ps) if background else ps
    per_match = torch.stack([F.binary_cross_entropy_with_logits(xs, target, reduction="none").sum(-1),
                             (bss - bts).abs().sum(-1), 1 - elementwise_giou(bss, bts)], 1)  # [K, 3]
    return (per_match * weight).sum(0)


def logits_distillation(student: DecoderPredictions, teacher: DecoderPredictions, mapping: list[int],
                        cfg: LogitsKDConfig) -> dict:
    """Sum over layer pairs (s, mapping[s]) of the matched-pair KD loss. Returns the weighted total
    'kd_logits' and its unweighted terms (summed over layer pairs) for logging.

    split == "all" (official code): every teacher prediction takes part, so the teacher's confident
    background reaches the student. split == "positive_negative" (paper's reading): teacher predictions
    with max probability >= threshold are matched and distilled as pseudo ground truth; the rest are matched
    among the remaining student predictions, with a class term pushing to background and the box terms.
    """
    return start_logits_distillation(student, teacher, mapping, cfg)()


class KDMatching:
    """The teacher-student assignment of a step, started on its predictions: what the logits term distils and
    the contrastive term pairs. Constructing it queues the KD cost and starts its solve (see `start_on_host`);
    `loss()` and `pairs()` wait for it. Between the two the caller queues the rest of the step's GPU work."""

    def __init__(self, student: DecoderPredictions, teacher: DecoderPredictions, mapping: list[int],
                 cfg: LogitsKDConfig):
        self.cfg = cfg
        self.x, self.bs = student.logits, student.boxes                # [P, B, N_S, C], [P, B, N_S, 4]
        p, bt = teacher.logits.detach().float(), teacher.boxes.detach().float()
        if list(mapping) != list(range(len(p))):  # the layer-wise mapping of equal depths pairs layers as they are
            t_idx = host_to_device(torch.as_tensor(mapping), p.device)
            p, bt = p[t_idx], bt[t_idx]
        self.p, self.bt = p.sigmoid(), clamp_cxcywh(bt)                # [P, B, N_T, C], [P, B, N_T, 4]
        cost = kd_cost(self.x.detach(), self.bs.detach(), self.p, self.bt, cfg)
        if cfg.split == "all":
            self._wait = match_to_teacher(cost)
        else:
            self._wait = start_on_host(_solve_split, cost, self.p.max(-1).values >= cfg.threshold)  # [P, B, N_T]
        self._matches = None

    def matches(self):
        """split "all": per (pair, image) (student_idx, teacher_idx); "positive_negative": (positives, negatives),
        each such a list."""
        if self._matches is None:
            self._matches = self._wait()
        return self._matches

    def pairs(self) -> list:
        """Every matched pair, per (pair, image) (student_idx, teacher_idx): with the split, positives then
        negatives."""
        if self.cfg.split == "all":
            return self.matches()
        return [(torch.cat([ps, ns]), torch.cat([pt, nt])) for (ps, pt), (ns, nt) in zip(*self.matches())]

    def loss(self) -> dict:
        """The weighted total 'kd_logits' and its unweighted terms (summed over layer pairs) for logging."""
        cfg, x, bs, p, bt = self.cfg, self.x, self.bs, self.p, self.bt
        if cfg.split == "all":
            terms = _pairwise_loss(x, bs, p, bt, self.matches())
        else:
            pos_matches, neg_matches = self.matches()
            terms = _pairwise_loss(x, bs, p, bt, pos_matches) + _pairwise_loss(x, bs, p, bt, neg_matches,
                                                                               background=True)
        total = weighted_sum(terms, [cfg.weight * cfg.cost_cls, cfg.weight * cfg.cost_l1, cfg.weight * cfg.cost_giou])
        return {"kd_logits": total, **{f"kd_logits_{k}": v for k, v in zip(("cls", "l1", "giou"), terms.detach())}}


def start_logits_distillation(student: DecoderPredictions, teacher: DecoderPredictions, mapping: list[int],
                              cfg: LogitsKDConfig) -> Callable[[], dict]:
    """`logits_distillation` in two halves: the assignment started now, the returned `finish()` waits for it
    and computes the loss."""
    return KDMatching(student, teacher, mapping, cfg).loss
