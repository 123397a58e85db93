"""Query-prior assignment distillation (METHOD.md section 3).

DETR's bipartite assignment is unstable early in training. The teacher's learned initial queries go through
the student's decoder as an extra, detached group; each of that group's queries is supervised by the ground
truth that the teacher's own Hungarian matching assigned to the same teacher query (at the teacher layer
mapped to the student layer). Unassigned queries are background. Training only.
"""
from trainers.criterion import weighted_sum
from trainers.models.output import DecoderPredictions


def query_prior_loss(student_group: DecoderPredictions, teacher_indices: list, targets: list, mapping: list[int],
                     criterion, scale: float = 1.0) -> dict:
    """student_group: the extra group's predictions [L_S, B, N_T, ...]; teacher_indices[t][b] = (teacher query
    idx, target idx) of the teacher's layer-t assignment to ground truth. Returns the weighted detection loss
    (focal, L1, GIoU as the criterion weights them) summed over student layers, times `scale` (the term's KD
    weight), as 'kd_query_prior'."""
    terms = criterion.layer_losses(student_group.logits, student_group.boxes, targets,
                                   query_prior_indices(teacher_indices, mapping))  # every student layer in one go
    return query_prior_total(terms, criterion, scale)


def query_prior_indices(teacher_indices: list, mapping: list[int]) -> list:
    """The assignment that supervises the group at each student layer s: the teacher's at layer mapping[s]."""
    return [teacher_indices[t] for t in mapping]


def query_prior_total(terms: dict, criterion, scale: float = 1.0) -> dict:
    """The group's per-layer terms {'cls', 'l1', 'giou'} [L_S] -> 'kd_query_prior', times `scale`."""
    return {"kd_query_prior": weighted_sum(criterion.term_sums(terms),
                                           [scale * w for w in criterion.weights.values()])}
