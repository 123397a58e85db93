"""The distillation training objective: detection loss of the student plus the configured KD terms.

L = L_det(student, GT) + lambda_logits L_logits + lambda_feat L_feat + lambda_qp L_query_prior
    + lambda_cl L_contrastive                                                                   (detrdistill)
L = L_det(student, GT) + L_baseline                                                          (fitnet/fgd/mgd)

The teacher is frozen: eval mode, no gradients, not in the optimizer, not in the student's checkpoint.
Terms whose weight is 0 are not computed at all, so with every weight at 0 the objective is exactly the
plain student's (same forward, same loss, same gradients).

A step's Hungarian assignments (the student's to the ground truth for its detection loss, the query group's
for the query prior, the teacher-student one of the logits and contrastive terms) are each started as soon as its predictions are
there and collected only where its loss is built: on a GPU the host queues the other terms while it solves
them (accel.start_on_host). `__call__` runs a step's parts in order; accel.teacher_ahead.RunAhead runs the
same parts with the teacher's forward on the next batch queued in between.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from trainers.config import DistillConfig
from trainers.criterion import float32_losses
from trainers.distill.feature import feature_adapters, feature_distillation
from trainers.distill.contrastive import ContrastiveHead, contrastive_distillation
from trainers.distill.logits import KDMatching
from trainers.distill.mapping import layer_mapping
from trainers.distill.query_prior import query_prior_indices, query_prior_loss, query_prior_total
from trainers.models.output import DecoderPredictions, DetectorOutput, QueryGroup


@dataclass
class Step:
    """What a step's losses read: each detector's output and its predictions with float32 logits and boxes, and
    the assignments started on them (`wait()`s; None where the term is off). Filled by `begin` (the teacher's)
    and `add_student`."""
    t_out: DetectorOutput
    t_pred: Optional[DecoderPredictions]  # DETRDistill's (the baselines read features only)
    teacher_matching: Optional[Callable]  # the teacher's assignment to the ground truth (query prior "teacher")
    queries: Optional[QueryGroup]  # the teacher's query group, decoded by the student (query prior)
    s_out: Optional[DetectorOutput] = None
    s_pred: Optional[DecoderPredictions] = None
    student_matching: Optional[Callable] = None
    group_matching: Optional[Callable] = None  # the query group's own assignment (query prior "self")
    kd: Optional[KDMatching] = None  # the teacher-student assignment of the logits and contrastive terms


class DistillationLoss:
    """Callable (student, images, mask, targets) -> dict of losses with the total under 'loss'.

    `trainable` holds the objective's own learnable modules (feature adapters, baseline generators); the
    engine optimises and checkpoints them with the student.
    """

    def __init__(self, teacher: nn.Module, criterion, cfg: DistillConfig, student_dim: int, teacher_dim: int,
                 student_layers: int, teacher_layers: int, num_levels: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.criterion = criterion
        self.cfg = cfg
        self.mapping = layer_mapping(cfg.layer_mapping, student_layers, teacher_layers)
        self.trainable = nn.ModuleDict()
        if cfg.method == "detrdistill" and cfg.feature.weight > 0:
            self.trainable["feature_adapters"] = feature_adapters(student_dim, teacher_dim, num_levels)
        elif cfg.method in ("fitnet", "fgd", "mgd"):
            from trainers.distill.baselines import build_baseline
            self.trainable["baseline"] = build_baseline(cfg.method, student_dim, teacher_dim, num_levels,
                                                        cfg.baseline.weight)
        detrdistill = cfg.method == "detrdistill"
        self.logits_term = detrdistill and cfg.logits.weight > 0
        self.contrastive = detrdistill and cfg.contrastive.weight > 0
        if self.contrastive:
            self.trainable["contrastive_head"] = ContrastiveHead(student_dim, teacher_dim, cfg.contrastive.dim)
        # the teacher-student assignment is the long CPU wait of a step, which the teacher's forward on the next
        # batch can fill (accel.teacher_ahead.RunAhead)
        self.kd_matching = self.logits_term or self.contrastive
        self.query_prior = detrdistill and cfg.query_prior.weight > 0
        self.prior_from_teacher = self.query_prior and cfg.query_prior.assignment == "teacher"

    def to(self, device):
        self.teacher.to(device)
        self.trainable.to(device)
        return self

    def __call__(self, student, images, mask, targets) -> dict:
        """The teacher's forward, the student's (the teacher's query group decoded as an extra group under the
        query prior), then the detection loss and the KD terms."""
        t_out = self.teacher_output(images, mask)
        step = self.begin(t_out, targets)
        self.add_student(step, student(images, mask, queries=step.queries), targets)
        return self.losses(step, images, targets)

    def teacher_output(self, images, mask):
        """The frozen teacher's forward, without gradients."""
        with torch.no_grad():
            return self.teacher(images, mask)

    def begin(self, t_out, targets) -> Step:
        """A step from the teacher's output: its predictions as the terms read them, its assignment to the
        ground truth started (query prior "teacher"), its query group for the student."""
        with float32_losses(t_out.predictions.logits.device):  # cast once (under amp), as every term reads them
            t_pred = t_out.predictions.float() if self.cfg.method == "detrdistill" else None
            teacher_matching = self.criterion.start_indices(t_pred, targets) if self.prior_from_teacher else None
        return Step(t_out, t_pred, teacher_matching, t_out.queries.detach() if self.query_prior else None)

    def add_student(self, step: Step, s_out, targets) -> None:
        """The student's output into `step`: its predictions, its assignment to the ground truth (and the query
        group's own, query prior "self") and the teacher-student one started (on a GPU solved on the helper
        thread, one after the other)."""
        with float32_losses(s_out.predictions.logits.device):
            step.s_out, step.s_pred = s_out, s_out.predictions.float()
            step.student_matching = self.criterion.start_indices(step.s_pred, targets)
            if self.query_prior and not self.prior_from_teacher:
                step.group_matching = self.criterion.start_indices(s_out.extra.float(), targets)
            if self.kd_matching:
                step.kd = KDMatching(step.s_pred, step.t_pred, self.mapping, self.cfg.logits)

    def losses(self, step: Step, images, targets) -> dict:
        """Detection loss and the KD terms (float32), each assignment collected where its loss needs it, the
        teacher-student one last."""
        cfg, s_out, t_out = self.cfg, step.s_out, step.t_out
        with float32_losses(images.device):
            kd = {}
            if cfg.method == "detrdistill":
                if cfg.feature.weight > 0:
                    kd.update(feature_distillation(s_out.features, t_out.features, step.t_pred, targets,
                                                   self.trainable["feature_adapters"], cfg.feature))
            elif cfg.method in ("fitnet", "fgd", "mgd"):
                kd[f"kd_{cfg.method}"] = self.trainable["baseline"](
                    [f.float() for f in s_out.features], [f.detach().float() for f in t_out.features],
                    s_out.masks, targets, tuple(images.shape[-2:]))
            group_indices = None  # what supervises the query group at each student layer
            if step.teacher_matching is not None:
                group_indices = query_prior_indices(step.teacher_matching(), self.mapping)
            elif step.group_matching is not None:
                group_indices = step.group_matching()
            losses, qp = self._detection_and_query_prior(step.s_pred, s_out.extra, targets, step.student_matching(),
                                                         group_indices)
            if qp is not None:
                kd.update(qp)
            if step.kd is not None and self.logits_term:  # the assignment solved meanwhile
                kd = {**step.kd.loss(), **kd}
            if step.kd is not None and self.contrastive:
                kd.update(contrastive_distillation(self.trainable["contrastive_head"], s_out.hidden, t_out.hidden,
                                                   self.mapping, step.kd.pairs(), cfg.contrastive.weight,
                                                   cfg.contrastive.temperature))
            weighted = [v for k, v in kd.items() if k in ("kd_logits", "kd_feature", "kd_query_prior", "kd_contrastive")
                        or k == f"kd_{cfg.method}"]
            if weighted:
                losses["loss_det"] = losses["loss"].detach()
                losses["loss"] = sum(weighted, losses["loss"])
            losses.update({k: v.detach() if torch.is_tensor(v) else v for k, v in kd.items()})
            return losses

    def _detection_and_query_prior(self, s_pred, group, targets, student_indices, group_indices):
        """-> (the student's set loss as SetCriterion returns it, the query-prior loss times its KD weight or None).

        group: the extra query group's predictions [L_S, B, N_T, ...]; group_indices: per student layer the
        assignment that supervises it (None: query prior off). When the group has the student's own query
        count (the paper's 300 and 300) both losses are one batched criterion call over 2 L_S groups, the
        student's layers then the group's: on a GPU the set loss's launches (forward and backward) are paid
        once a step, not twice."""
        criterion, scale = self.criterion, self.cfg.query_prior.weight
        if group_indices is None:
            return criterion(s_pred, targets, indices=student_indices), None
        # other query counts, or indices for another depth (the criterion's own call then names the mismatch)
        if group.logits.shape[2:] != s_pred.logits.shape[2:] or len(student_indices) != s_pred.num_layers:
            return (criterion(s_pred, targets, indices=student_indices),
                    query_prior_loss(group, group_indices, targets, criterion, scale))
        layers = s_pred.num_layers
        terms = criterion.layer_losses(torch.cat([s_pred.logits, group.logits.float()]),
                                       torch.cat([s_pred.boxes, group.boxes.float()]), targets,
                                       list(student_indices) + list(group_indices))
        return (criterion.summed({k: v[:layers] for k, v in terms.items()}),
                query_prior_total({k: v[layers:] for k, v in terms.items()}, criterion, scale))
