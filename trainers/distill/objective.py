"""The distillation training objective: detection loss of the student plus the configured KD terms.

L = L_det(student, GT) + lambda_logits L_logits + lambda_feat L_feat + lambda_qp L_query_prior   (detrdistill)
L = L_det(student, GT) + L_baseline                                                          (fitnet/fgd/mgd)

The teacher is frozen: eval mode, no gradients, not in the optimizer, not in the student's checkpoint.
Terms whose weight is 0 are not computed at all, so with every weight at 0 the objective is exactly the
plain student's (same forward, same loss, same gradients).
"""
import torch
from torch import nn

from trainers.config import DistillConfig
from trainers.criterion import float32_losses
from trainers.distill.feature import feature_adapters, feature_distillation
from trainers.distill.logits import start_logits_distillation
from trainers.distill.mapping import layer_mapping
from trainers.distill.query_prior import query_prior_indices, query_prior_loss, query_prior_total
from trainers.distill.teacher_ahead import TeacherAhead


class DistillationLoss:
    """Callable (student, images, mask, targets) -> dict of losses with the total under 'loss'.

    `trainable` holds the objective's own learnable modules (feature adapters, baseline generators); the
    engine optimises and checkpoints them with the student.
    """

    def __init__(self, teacher: nn.Module, criterion, cfg: DistillConfig, student_dim: int, teacher_dim: int,
                 student_layers: int, teacher_layers: int, num_levels: int, teacher_thread: bool = False):
        self.teacher = teacher.eval().requires_grad_(False)
        # the teacher's forward on the next batch (see __call__'s `upcoming`) issued by a helper thread, beside
        # this step (teacher_ahead.py; RuntimeConfig.overlap_teacher "thread")
        self.teacher_thread = teacher_thread
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

        # the teacher-student matching is the long CPU wait of a step; the teacher's forward on the next
        # batch can run on the GPU meanwhile (see __call__'s `upcoming`)
        self.overlaps_teacher = cfg.method == "detrdistill" and cfg.logits.weight > 0
        self._queued = None  # (images, mask, teacher output) computed ahead for the next call

    def to(self, device):
        self.teacher.to(device)
        self.trainable.to(device)
        return self

    def _teacher_output(self, images, mask):
        """The teacher's output on this batch: the one queued by the previous call if it was for these very
        tensors, else computed now."""
        queued, self._queued = self._queued, None
        if queued is not None:  # a forward on the helper thread finishes first, used or not: the teacher
            # (its modules, its bf16 weight slots) serves one call at a time
            out = queued[2].result() if isinstance(queued[2], TeacherAhead) else queued[2]
            if queued[0] is images and queued[1] is mask:
                return out
        with torch.no_grad():
            return self.teacher(images, mask)

    def _queue_teacher(self, images, mask):
        if self.teacher_thread:
            self._queued = (images, mask, TeacherAhead(self.teacher, images, mask))
            return
        with torch.no_grad():
            self._queued = (images, mask, self.teacher(images, mask))

    def __call__(self, student, images, mask, targets, upcoming=None) -> dict:
        """upcoming: (images, mask) of the next call, already on the device, or None. Given, the teacher's
        forward on it is queued right after this step's assignments are started (teacher_thread: at the start
        of this call, by the helper thread), and the next call uses it: the same values, but on a GPU the
        teacher runs while the CPU solves the assignments.

        On a GPU nothing here makes the host wait for the GPU: every assignment (the teacher's to the ground
        truth for the query prior, the student's for its detection loss, the teacher-student one of the logits
        term) is started as soon as its predictions are queued and collected only when its loss is built, so
        the host queues the teacher's next forward and the other terms meanwhile (matching.start_on_host)."""
        cfg = self.cfg
        use_qp = cfg.method == "detrdistill" and cfg.query_prior.weight > 0
        t_out = self._teacher_output(images, mask)
        if upcoming is not None and self.teacher_thread:  # at once: it runs beside all of this step
            self._queue_teacher(*upcoming)
        with float32_losses(images.device):  # logits and boxes as every term reads them, cast once (under amp)
            t_pred = t_out.predictions.float() if cfg.method == "detrdistill" else None  # baselines: features
            teacher_matching = self.criterion.start_indices(t_pred, targets) if use_qp else None
        s_out = student(images, mask, queries=t_out.queries.detach() if use_qp else None)
        with float32_losses(images.device):
            s_pred = s_out.predictions.float()
            student_matching = self.criterion.start_indices(s_pred, targets)
        finish_logits = None
        if self.overlaps_teacher:  # the logits KD term is on; on a GPU its assignment is solved on the helper
            # thread (after the student's) while this one queues the teacher's next forward and the other terms
            with float32_losses(images.device):
                finish_logits = start_logits_distillation(s_pred, t_pred, self.mapping, cfg.logits)
        if upcoming is not None and not self.teacher_thread:
            self._queue_teacher(*upcoming)  # under the caller's autocast, as every teacher forward
        with float32_losses(images.device):
            return self._losses(s_out, t_out, s_pred, t_pred, images, targets, student_matching,
                                teacher_matching, finish_logits)

    def _losses(self, s_out, t_out, s_pred, t_pred, images, targets, student_matching, teacher_matching,
                finish_logits) -> dict:
        """Detection loss and the KD terms (float32), each assignment collected where its loss needs it, the
        logits term's last. s_pred / t_pred: the student's / teacher's predictions with float32 logits and
        boxes; *_matching / finish_logits: the `wait()`s of the started assignments (None: term off)."""
        cfg = self.cfg
        kd = {}
        if cfg.method == "detrdistill":
            if cfg.feature.weight > 0:
                kd.update(feature_distillation(s_out.features, t_out.features, t_pred, targets,
                                               self.trainable["feature_adapters"], cfg.feature))
        elif cfg.method in ("fitnet", "fgd", "mgd"):
            kd[f"kd_{cfg.method}"] = self.trainable["baseline"](
                [f.float() for f in s_out.features], [f.detach().float() for f in t_out.features], s_out.masks,
                targets, tuple(images.shape[-2:]))
        teacher_indices = teacher_matching() if teacher_matching is not None else None
        losses, qp = self._detection_and_query_prior(s_pred, s_out.extra, targets, student_matching(),
                                                     teacher_indices)
        if qp is not None:
            kd.update(qp)
        if finish_logits is not None:  # the assignment solved meanwhile
            kd = {**finish_logits(), **kd}
        weighted = [v for k, v in kd.items() if k in ("kd_logits", "kd_feature", "kd_query_prior")
                    or k == f"kd_{cfg.method}"]
        if weighted:
            losses["loss_det"] = losses["loss"].detach()
            losses["loss"] = sum(weighted, losses["loss"])
        losses.update({k: v.detach() if torch.is_tensor(v) else v for k, v in kd.items()})
        return losses

    def _detection_and_query_prior(self, s_pred, group, targets, student_indices, teacher_indices):
        """-> (the student's set loss as SetCriterion returns it, the query-prior loss times its KD weight or None).

        group: the extra query group's predictions [L_S, B, N_T, ...]; teacher_indices: the teacher's per-layer
        assignment to the ground truth (None: query prior off). When the group has the student's own query
        count (the paper's 300 and 300) both losses are one batched criterion call over 2 L_S groups, the
        student's layers then the group's: on a GPU the set loss's ~90 launches (forward and backward) are
        paid once a step, not twice."""
        criterion, scale = self.criterion, self.cfg.query_prior.weight
        if teacher_indices is None:
            return criterion(s_pred, targets, indices=student_indices), None
        # other query counts, or indices for another depth (the criterion's own call then names the mismatch)
        if group.logits.shape[2:] != s_pred.logits.shape[2:] or len(student_indices) != s_pred.num_layers:
            return (criterion(s_pred, targets, indices=student_indices),
                    query_prior_loss(group, teacher_indices, targets, self.mapping, criterion, scale))
        layers = s_pred.num_layers
        terms = criterion.layer_losses(torch.cat([s_pred.logits, group.logits.float()]),
                                       torch.cat([s_pred.boxes, group.boxes.float()]), targets,
                                       list(student_indices) + query_prior_indices(teacher_indices, self.mapping))
        return (criterion.summed({k: v[:layers] for k, v in terms.items()}),
                query_prior_total({k: v[layers:] for k, v in terms.items()}, criterion, scale))
