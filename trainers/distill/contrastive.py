"""Query contrastive distillation: the official DETRDistill run's fourth term (not in the paper's text).

Per layer pair (s, t), the student's layer-s decoder outputs and the teacher's layer-t outputs are paired by
the logits-KD matching (student query i <-> the teacher query it was matched to). Each side passes its own
projection (a linear layer to `dim`, then Linear-BatchNorm-ReLU-Linear) and is L2-normalised; InfoNCE over
the batch's matched pairs at temperature T then asks every teacher query to pick out its own student query
among all the others of the batch (every image, every query). The projection heads train with the student.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.criterion import flat_matches


def _projection(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim),
                         nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


class ContrastiveHead(nn.Module):
    """Two projections onto one unit sphere of `dim` dimensions: the student's and the teacher's."""

    def __init__(self, student_dim: int, teacher_dim: int, dim: int = 512):
        super().__init__()
        self.student = _projection(student_dim, dim)
        self.teacher = _projection(teacher_dim, dim)

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """student [K, d_S], teacher [K, d_T] (row k of each a matched pair) -> both [K, dim], unit norm."""
        return F.normalize(self.student(student), dim=1), F.normalize(self.teacher(teacher), dim=1)


def info_nce(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """student, teacher [K, D] unit vectors, row k of each a positive pair -> mean over teacher rows k of
    -log softmax_j(<teacher_k, student_j> / T)[k]: the other K-1 student rows are the negatives."""
    logits = teacher @ student.T / temperature                                     # [K, K]
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def contrastive_distillation(head: ContrastiveHead, student_hidden: Tensor, teacher_hidden: Tensor,
                             mapping: list[int], matches: list, weight: float, temperature: float) -> dict:
    """student_hidden [L_S, B, N_S, d_S], teacher_hidden [L_T, B, N_T, d_T]; matches: the logits-KD
    assignment, per (pair, image) in that order (student_idx, teacher_idx), pair s teaching layer s with
    teacher layer mapping[s]. -> {'kd_contrastive': weight x sum over layer pairs of InfoNCE}.

    Each layer pair is its own InfoNCE (and its own batch-norm batch), as the official code runs one per
    decoder stage. A pair with fewer than two matches has no negatives and adds nothing."""
    B = student_hidden.shape[1]
    total = student_hidden.new_zeros(())
    for s, t in enumerate(mapping):
        _, image, rows, cols = flat_matches([matches[s * B:(s + 1) * B]], B, student_hidden.device)
        if len(rows) < 2:
            continue
        z_s, z_t = head(student_hidden[s, image, rows].float(), teacher_hidden[t, image, cols].detach().float())
        total = total + info_nce(z_s, z_t, temperature)
    return {"kd_contrastive": weight * total}
