"""Query-prior assignment distillation (docs/method.md).

DETR's bipartite assignment is unstable early in training. The teacher's learned initial queries go through
the student's decoder as an extra, detached group, supervised by the ground truth with the detection loss.
Which ground truth each of its queries gets: its own Hungarian matching (assignment "self", Group-DETR style,
what the official code runs), or the one the teacher's matching assigned to the same teacher query at the
teacher layer mapped to the student layer (assignment "teacher", the paper's text). Unassigned queries are
background. Training only.
"""
from trainers.criterion import weighted_sum
from trainers.models.output import DecoderPredictions


def query_prior_loss(student_group: DecoderPredictions, group_indices: list, targets: list, criterion,
                     scale: float = 1.0) -> dict:
    """student_group: the extra group's predictions [L_S, B, N_T, ...]; group_indices[s][b] = (group query idx,
    target idx) supervising student layer s (its own matching, or `query_prior_indices` of the teacher's).
    Returns the weighted detection loss (focal, L1, GIoU as the criterion weights them) summed over student
    layers, times `scale` (the term's KD weight), as 'kd_query_prior'."""
    terms = criterion.layer_losses(student_group.logits.float(), student_group.boxes.float(), targets,
                                   group_indices)  # every student layer in one go
    return query_prior_total(terms, criterion, scale)


def query_prior_indices(teacher_indices: list, mapping: list[int]) -> list:
    """Assignment "teacher": what supervises the group at each student layer s, the teacher's assignment at
    layer mapping[s] (teacher_indices[t][b] = (teacher query idx, target idx))."""
    return [teacher_indices[t] for t in mapping]


def query_prior_total(terms: dict, criterion, scale: float = 1.0) -> dict:
    """The group's per-layer terms {'cls', 'l1', 'giou'} [L_S] -> 'kd_query_prior', times `scale`."""
    return {"kd_query_prior": weighted_sum(criterion.term_sums(terms),
                                           [scale * w for w in criterion.weights.values()])}
