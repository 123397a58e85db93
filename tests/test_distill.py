"""DETRDistill's three terms and the layer mapping, each against an independent reference."""
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from conftest import tiny_distill_trial
from trainers.config import DistillConfig, FeatureKDConfig, LogitsKDConfig, ModelConfig
from trainers.criterion import SetCriterion
from trainers.distill.feature import feature_adapters, feature_distillation
from trainers.distill.logits import kd_cost, logits_distillation, match_to_teacher
from trainers.distill.mapping import layer_mapping
from trainers.distill.objective import DistillationLoss
from trainers.distill.query_prior import query_prior_loss
from trainers.engine import DetectionLoss, run_trial
from trainers.models import build_detector
from trainers.models.output import DecoderPredictions


# -- reference helpers, float64 and loop-based -------------------------------------------------------------
def ref_giou(a, b):
    """a, b: (cx, cy, w, h) floats -> GIoU."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def ref_iou(a, b):
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def ref_bce(x, p):
    s = 1 / (1 + np.exp(-x))
    return -(p * np.log(s) + (1 - p) * np.log(1 - s))


def ref_cost(x, bs, p, bt, w=(1.0, 5.0, 2.0)):
    """x [N, C] logits, bs [N, 4], p [M, C] probs, bt [M, 4] -> [N, M] by the formula of docs/method.md."""
    N, M = x.shape[0], p.shape[0]
    c = np.zeros((N, M))
    for n in range(N):
        for m in range(M):
            c[n, m] = w[0] * ref_bce(x[n], p[m]).sum() + w[1] * np.abs(bs[n] - bt[m]).sum() \
                - w[2] * ref_giou(bs[n], bt[m])
    return c


def random_predictions(L, B, N, C, seed, d=8):
    g = torch.Generator().manual_seed(seed)
    cxcy = torch.rand(L, B, N, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(L, B, N, 2, generator=g) * 0.3 + 0.05
    return DecoderPredictions(torch.randn(L, B, N, C, generator=g) * 2, torch.cat([cxcy, wh], -1),
                              torch.randn(L, B, N, d, generator=g))


# -- layer mapping -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,teacher,student,expected", [
    ("last", 6, 3, [3, 4, 5]), ("last", 6, 2, [4, 5]), ("last", 6, 6, [0, 1, 2, 3, 4, 5]),
    ("last", 3, 6, [0, 0, 0, 0, 1, 2]),
    ("first", 6, 3, [0, 1, 2]), ("first", 6, 2, [0, 1]), ("first", 3, 6, [0, 1, 2, 2, 2, 2]),
    ("uniform", 6, 3, [1, 3, 5]), ("uniform", 6, 2, [2, 5]), ("uniform", 6, 6, [0, 1, 2, 3, 4, 5]),
    ("uniform", 3, 6, [0, 0, 1, 1, 2, 2]),
    ("final", 6, 3, [5, 5, 5]), ("final", 6, 2, [5, 5]), ("final", 3, 6, [2] * 6),
    ("layerwise", 6, 6, [0, 1, 2, 3, 4, 5]), ([0, 2, 5], 6, 3, [0, 2, 5]),
])
def test_mapping_tables(strategy, teacher, student, expected):
    assert layer_mapping(strategy, student, teacher) == expected


@pytest.mark.parametrize("strategy,teacher,student,message", [
    ("layerwise", 6, 3, "equal depths"), ([0, 1], 6, 3, "2 entries"), ([0, 1, 6], 6, 3, r"\[6\]"),
    ("sideways", 6, 3, "unknown"),
])
def test_mapping_refuses_impossible(strategy, teacher, student, message):
    with pytest.raises(ValueError, match=message):
        layer_mapping(strategy, student, teacher)


# -- logits distillation --------------------------------------------------------------------------------------
def test_kd_cost_equals_formula_and_assignment_equals_scipy_and_brute_force():
    s, t = random_predictions(2, 2, 4, 3, seed=1), random_predictions(2, 2, 4, 3, seed=2)
    cfg = LogitsKDConfig()
    cost = kd_cost(s.logits, s.boxes, t.logits.sigmoid(), t.boxes, cfg)
    matches = match_to_teacher(cost)()
    for l, b in itertools.product(range(2), range(2)):
        ref = ref_cost(s.logits[l, b].double().numpy(), s.boxes[l, b].double().numpy(),
                       t.logits[l, b].double().sigmoid().numpy(), t.boxes[l, b].double().numpy())
        np.testing.assert_allclose(cost[l, b].numpy(), ref, rtol=1e-5, atol=1e-5)
        rows, cols = linear_sum_assignment(ref)
        got_rows, got_cols = matches[l * 2 + b]
        assert got_rows.tolist() == rows.tolist() and got_cols.tolist() == cols.tolist()
        brute = min(sum(ref[i, perm[i]] for i in range(4)) for perm in itertools.permutations(range(4)))
        assert ref[got_rows.numpy(), got_cols.numpy()].sum() == pytest.approx(brute)


def test_kd_assignment_is_rectangular_when_query_counts_differ():
    s, t = random_predictions(1, 1, 5, 3, seed=3), random_predictions(1, 1, 3, 3, seed=4)
    cost = kd_cost(s.logits, s.boxes, t.logits.sigmoid(), t.boxes, LogitsKDConfig())
    rows, cols = match_to_teacher(cost)()[0]
    assert len(rows) == 3 and sorted(cols.tolist()) == [0, 1, 2]
    ref = cost[0, 0].double().numpy()
    brute = min(sum(ref[r, c] for c, r in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert ref[rows.numpy(), cols.numpy()].sum() == pytest.approx(brute, rel=1e-6)


def test_logits_loss_equals_hand_computation():
    s, t = random_predictions(3, 2, 4, 3, seed=5), random_predictions(4, 2, 4, 3, seed=6)
    mapping = [1, 2, 3]
    out = logits_distillation(s, t, mapping, LogitsKDConfig(weight=0.5))
    expected = 0.0
    for si, ti in enumerate(mapping):
        pair = {"cls": 0.0, "l1": 0.0, "giou": 0.0}
        n = 0
        for b in range(2):
            x, bs = s.logits[si, b].double().numpy(), s.boxes[si, b].double().numpy()
            p, bt = t.logits[ti, b].double().sigmoid().numpy(), t.boxes[ti, b].double().numpy()
            rows, cols = linear_sum_assignment(ref_cost(x, bs, p, bt))
            for r, c in zip(rows, cols):
                pair["cls"] += ref_bce(x[r], p[c]).sum()
                pair["l1"] += np.abs(bs[r] - bt[c]).sum()
                pair["giou"] += 1 - ref_giou(bs[r], bt[c])
                n += 1
        expected += (pair["cls"] + 5 * pair["l1"] + 2 * pair["giou"]) / n
    assert out["kd_logits"].item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_positive_negative_split_matches_groups_separately():
    s, t = random_predictions(1, 1, 6, 2, seed=7), random_predictions(1, 1, 6, 2, seed=8)
    t.logits[0, 0, :2] = 6.0   # two confident teacher predictions (positives)
    t.logits[0, 0, 2:] = -6.0  # the rest background
    cfg = LogitsKDConfig(split="positive_negative", threshold=0.5)
    out = logits_distillation(s, t, [0], cfg)
    # reference: positives matched first among all student predictions, negatives among the remaining ones
    x, bs = s.logits[0, 0].double().numpy(), s.boxes[0, 0].double().numpy()
    p, bt = t.logits[0, 0].double().sigmoid().numpy(), t.boxes[0, 0].double().numpy()
    cost = ref_cost(x, bs, p, bt)
    pr, pc = linear_sum_assignment(cost[:, :2])
    free = [i for i in range(6) if i not in pr]
    nr, nc = linear_sum_assignment(cost[free][:, 2:])
    pos = sum(ref_bce(x[r], p[c]).sum() + 5 * np.abs(bs[r] - bt[c]).sum() + 2 * (1 - ref_giou(bs[r], bt[c]))
              for r, c in zip(pr, pc)) / 2
    neg = sum(ref_bce(x[free[r]], np.zeros(2)).sum() + 5 * np.abs(bs[free[r]] - bt[2 + c]).sum()
              + 2 * (1 - ref_giou(bs[free[r]], bt[2 + c])) for r, c in zip(nr, nc)) / 4
    assert out["kd_logits"].item() == pytest.approx(pos + neg, rel=1e-5)


# -- feature distillation -------------------------------------------------------------------------------------
def test_feature_mask_and_loss_equal_float64_loop():
    torch.manual_seed(0)
    L, B, N, C, d = 2, 3, 5, 3, 8
    t = random_predictions(L, B, N, C, seed=9, d=d)
    # an image with no ground truth, and one with fewer boxes than the batch's most (padded columns)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.6, 0.2, 0.1]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
               {"boxes": torch.tensor([[0.6, 0.4, 0.1, 0.2]]), "labels": torch.tensor([1])}]
    ft = [torch.randn(B, d, 4, 5), torch.randn(B, d, 2, 3)]
    fs = [torch.randn(B, d, 4, 5), torch.randn(B, d, 2, 3)]
    cfg = FeatureKDConfig(weight=1.0, top_k=4)
    out = feature_distillation(fs, ft, t, targets, feature_adapters(d, d, 2), cfg)

    expected = 0.0
    for l in range(L):
        for j in range(2):
            H, W = ft[j].shape[-2:]
            total = 0.0
            for b in range(B):
                probs = t.logits[l, b].double().sigmoid().numpy()
                order = np.argsort(-probs.ravel(), kind="stable")[:4]
                psi = np.zeros((H, W))
                for flat in order:
                    q, c = divmod(int(flat), C)
                    box = t.boxes[l, b, q].double().numpy()
                    gts = targets[b]["boxes"].double().numpy()
                    quality = probs[q, c] * (max(ref_iou(box, g) for g in gts) if len(gts) else 1.0)
                    qv = t.hidden[l, b, q].double().numpy()
                    for h in range(H):
                        for w in range(W):
                            fv = ft[j][b, :, h, w].double().numpy()
                            psi[h, w] += quality * qv.dot(fv) / (np.linalg.norm(qv) * np.linalg.norm(fv))
                psi = np.maximum(psi, 0.01)
                psi /= psi.max()
                diff = psi[None] * ft[j][b].double().numpy() - psi[None] * fs[j][b].double().numpy()
                total += (diff ** 2).sum()
            expected += total / (B * d * H * W)
    assert out["kd_feature"].item() == pytest.approx(expected, rel=1e-4)


def test_feature_plain_mask_ablation_differs_from_quality_weighting():
    t = random_predictions(1, 1, 5, 3, seed=10, d=8)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "labels": torch.tensor([0])}]
    ft, fs = [torch.randn(1, 8, 4, 4)], [torch.randn(1, 8, 4, 4)]
    adapters = feature_adapters(8, 8, 1)
    a = feature_distillation(fs, ft, t, targets, adapters, FeatureKDConfig(quality=True))["kd_feature"]
    b = feature_distillation(fs, ft, t, targets, adapters, FeatureKDConfig(quality=False))["kd_feature"]
    assert a.item() != pytest.approx(b.item())


def test_feature_adapter_when_widths_differ_gets_gradient():
    t = random_predictions(1, 1, 5, 3, seed=11, d=16)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "labels": torch.tensor([0])}]
    adapters = feature_adapters(8, 16, 1)
    fs = [torch.randn(1, 8, 4, 4, requires_grad=True)]
    out = feature_distillation(fs, [torch.randn(1, 16, 4, 4)], t, targets, adapters, FeatureKDConfig())
    out["kd_feature"].backward()
    assert adapters[0].weight.grad.abs().sum() > 0 and fs[0].grad.abs().sum() > 0


# -- query prior ------------------------------------------------------------------------------------------------
def _tiny_model(family="conditional_detr", seed=0, **kw):
    cfg = dict(family=family, backbone="resnet18", encoder_layers=1, decoder_layers=2, num_queries=6,
               hidden_dim=64, num_heads=4, ffn_dim=64, dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    return build_detector(ModelConfig(**cfg), 4).eval()


def _targets():
    return [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.2], [0.7, 0.6, 0.2, 0.3]])},
            {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


@pytest.mark.parametrize("family", ["conditional_detr", "deformable_detr"])
def test_query_prior_supervises_with_the_teachers_assignment(family):
    """A student that IS the teacher: its extra group reproduces the teacher's predictions, so the
    query-prior loss must equal the teacher's own set loss under its own Hungarian assignment."""
    teacher = _tiny_model(family)
    criterion = SetCriterion(4)
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        t_out = teacher(images)
        s_out = teacher(images, queries=t_out.queries.detach())
    indices = criterion.indices_for(t_out.predictions, _targets())
    qp = query_prior_loss(s_out.extra, indices, _targets(), criterion)["kd_query_prior"]
    reference = criterion(t_out.predictions, _targets())["loss"]
    assert qp.item() == pytest.approx(reference.item(), rel=1e-4)
    # and a different assignment gives a different loss: the targets really come from `indices`
    shuffled = [[(src.flip(0), tgt) for src, tgt in layer] for layer in indices]
    other = query_prior_loss(s_out.extra, shuffled, _targets(), criterion)["kd_query_prior"]
    assert other.item() != pytest.approx(qp.item())



def test_the_two_query_prior_readings():
    """assignment self: the query group is supervised through its own Hungarian matching to the ground truth;
    teacher: through the teacher's assignment of the same queries, layer by layer through the mapping (here the
    student's only layer learns from the teacher's last). The two differ."""
    from trainers.distill.query_prior import query_prior_indices
    teacher, student = _tiny_model(), _tiny_model(seed=1, decoder_layers=1).train()
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(4))
    criterion = SetCriterion(4)
    outputs = {}
    student.register_forward_hook(lambda module, args, out: outputs.__setitem__("student", out))
    teacher.register_forward_hook(lambda module, args, out: outputs.__setitem__("teacher", out))
    got = {}
    for assignment in ("self", "teacher"):
        objective = _objective(teacher, student, logits={"weight": 0}, feature={"weight": 0},
                               contrastive={"weight": 0}, query_prior={"weight": 0.5, "assignment": assignment})
        got[assignment] = objective(student, images, None, _targets())["kd_query_prior"]
    group, t_pred = outputs["student"].extra, outputs["teacher"].predictions
    own = criterion.indices_for(group, _targets())
    assert layer_mapping("last", 1, 2) == [1]  # the teacher's last layer
    teachers = query_prior_indices(criterion.indices_for(t_pred, _targets()), [1])
    for assignment, indices in (("self", own), ("teacher", teachers)):
        want = query_prior_loss(group, indices, _targets(), criterion, scale=0.5)["kd_query_prior"]
        assert torch.allclose(got[assignment], want, rtol=1e-6, atol=0), assignment
    assert not torch.allclose(got["self"], got["teacher"])


@pytest.mark.parametrize("teacher_queries", [6, 8])
def test_student_and_query_prior_losses_in_one_call_equal_the_two_apart(teacher_queries):
    """The objective's one batched criterion call over the student's layers and the extra group's (equal query
    counts; with 8 teacher queries against 6 the two calls apart) gives the losses and gradients of the
    student's set loss and the query-prior loss computed separately."""
    teacher, student = _tiny_model(num_queries=teacher_queries), _tiny_model(seed=1).train()
    objective = _objective(teacher, student)
    criterion = objective.criterion
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        t_out = teacher(images)
    s_out = student(images, queries=t_out.queries.detach())
    assert s_out.extra.logits.shape[2] == teacher_queries
    student_idx, teacher_idx = criterion.indices_for(s_out.predictions, _targets()), \
        criterion.indices_for(t_out.predictions, _targets())
    params = [p for p in student.parameters() if p.requires_grad]

    def losses_and_grads(det, qp):
        total = det["loss"] + 0.5 * qp["kd_query_prior"]
        return {**det, **qp}, torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    got, got_grads = losses_and_grads(*objective._detection_and_query_prior(
        s_out.predictions, s_out.extra, _targets(), student_idx, teacher_idx))
    want, want_grads = losses_and_grads(criterion(s_out.predictions, _targets(), indices=student_idx),
                                        query_prior_loss(s_out.extra, teacher_idx, _targets(), criterion))
    assert got.keys() == want.keys() and "kd_query_prior" in got
    for k in got:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=0), k
    assert sum(g is not None for g in got_grads) > 10
    for g, w in zip(got_grads, want_grads):
        # float32 sums over the backbone's pixels in another order: equal to ~1e-6 of each gradient's scale
        assert (g is None) == (w is None) and (g is None or (g - w).abs().max() <= 1e-5 * w.abs().max() + 1e-8)


# -- the objective -----------------------------------------------------------------------------------------
def _objective(teacher, student, **distill):
    cfg = DistillConfig(method="detrdistill", **distill)
    return DistillationLoss(teacher, SetCriterion(4), cfg, student.config.hidden_dim, teacher.config.hidden_dim,
                            student.config.decoder_layers, teacher.config.decoder_layers, student.config.levels)


@pytest.mark.parametrize("method", ["detrdistill", "mgd"])
def test_losses_run_in_float32_under_bf16_autocast(method):
    """bf16 autocast covers the detector forwards only: the detection loss and the KD terms (their matrix
    products included: the KD cost's class term, the feature mask's cosines, the adapters) are the float32
    computation on the same detector outputs - under autocast they would round through bf16."""
    from trainers.distill.logits import KDMatching
    from trainers.distill.objective import Step
    teacher, student = _tiny_model(), _tiny_model(seed=1).train()
    objective = _objective(teacher, student) if method == "detrdistill" else DistillationLoss(
        teacher, SetCriterion(4), DistillConfig(method=method), 64, 64, 2, 2, student.config.levels)
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    outputs = {}
    student.register_forward_hook(lambda module, args, out: outputs.__setitem__("student", out))
    teacher.register_forward_hook(lambda module, args, out: outputs.__setitem__("teacher", out))
    torch.manual_seed(5)  # MGD draws its random masks in the loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = objective(student, images, None, _targets())
    s_out, t_out = outputs["student"], outputs["teacher"]
    assert s_out.predictions.logits.dtype == torch.bfloat16 and s_out.features[0].dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    s_pred, t_pred = s_out.predictions.float(), t_out.predictions.float()
    kd = KDMatching(s_pred, t_pred, objective.mapping, objective.cfg.logits) if objective.kd_matching else None
    criterion = objective.criterion
    group_matching = criterion.start_indices(s_out.extra.float(), _targets()) if method == "detrdistill" else None
    torch.manual_seed(5)
    want = objective.losses(Step(t_out, t_pred, None, None, s_out, s_pred, criterion.start_indices(s_pred, _targets()),
                                 group_matching, kd), images, _targets())
    assert got.keys() == want.keys() and len(got) > 4
    assert all(v.dtype == torch.float32 for v in got.values() if torch.is_tensor(v))
    assert all(torch.equal(got[k], want[k]) for k in got), {k: (got[k], want[k]) for k in got}


def test_all_weights_zero_equals_plain_student_exactly():
    teacher, student = _tiny_model(), _tiny_model().train()
    zero = _objective(teacher, student, logits={"weight": 0}, feature={"weight": 0}, query_prior={"weight": 0},
                      contrastive={"weight": 0})
    plain = DetectionLoss(SetCriterion(4))
    images = torch.randn(2, 3, 64, 80)
    a = zero(student, images, None, _targets())["loss"]
    a.backward()
    grads_a = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    b = plain(student, images, None, _targets())["loss"]
    b.backward()
    assert torch.equal(a, b)
    for n, p in student.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads_a[n]), n


def test_teacher_gets_no_gradient_and_stays_bitwise_unchanged():
    teacher, student = _tiny_model(), _tiny_model(seed=1, ffn_dim=32).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = _objective(teacher, student)
    params = list(student.parameters()) + list(objective.trainable.parameters())
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
    for _ in range(3):
        losses = objective(student, torch.randn(2, 3, 64, 80), None, _targets())
        assert {"kd_logits", "kd_feature", "kd_query_prior", "loss_det"} <= set(losses)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p is q for p in teacher.parameters() for g in opt.param_groups for q in g["params"])


def test_teacher_run_ahead_gives_the_same_losses_and_gradients(monkeypatch):
    """accel.RunAhead: the teacher's forward on the next batch (`upcoming`) is queued while this step's KD
    assignment is solved and is reused by the next call; in the background (the GPU's way, forced here on the
    CPU) the solve runs on the helper thread while this one goes on; with thread the teacher's forward on the
    next batch is issued by its own helper thread, beside the step. Every way the losses and gradients are
    bitwise those of the plain objective, and the teacher runs once per batch, not twice."""
    import threading
    import trainers.accel.host as host_module
    import trainers.distill.logits as logits_module
    from trainers.accel.teacher_ahead import RunAhead
    teacher = _tiny_model()
    calls, events, solvers, teacher_threads = [], [], set(), []
    batches = [torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def record(module, args, out):  # which batch the teacher ran on, and where
        calls.append(1)
        events.append(f"T{next((i for i, b in enumerate(batches) if b is args[0]), '?')}")
        teacher_threads.append(threading.current_thread().name)
    teacher.register_forward_hook(record)
    solve = logits_module.solve_assignments

    def recorded_solve(problems):
        solvers.add(threading.current_thread().name)
        events.append("M")
        return solve(problems)
    monkeypatch.setattr(logits_module, "solve_assignments", recorded_solve)
    background = False
    monkeypatch.setattr(host_module, "solve_in_background", lambda device: background)
    results = {}
    for ahead, background, thread in [(False, False, False), (True, False, False), (False, True, False),
                                      (True, True, False), (True, False, True), (True, True, True)]:
        student = _tiny_model(seed=1).train()
        objective = _objective(teacher, student)
        assert objective.kd_matching
        loss_fn = RunAhead(objective, thread) if ahead else objective
        calls.clear()
        events.clear()
        solvers.clear()
        teacher_threads.clear()
        results[ahead, background, thread] = run = []
        for i, images in enumerate(batches):
            if ahead:
                loss_fn.upcoming = (batches[i + 1], None) if i + 1 < len(batches) else None
            losses = loss_fn(student, images, None, _targets())
            student.zero_grad()
            losses["loss"].backward()
            run.append(({k: v.clone() for k, v in losses.items()},
                                   [p.grad.clone() for p in student.parameters() if p.grad is not None]))
        assert len(calls) == len(batches)
        assert [e for e in events if e != "M"] == ["T0", "T1", "T2"] and events.count("M") == len(batches)
        if not background and not thread:  # solved where the step collects it (after the next teacher forward)
            assert events == (["T0", "T1", "M", "T2", "M", "M"] if ahead else ["T0", "M", "T1", "M", "T2", "M"])
        assert solvers == ({"kd-solve_0"} if background else {threading.current_thread().name})
        main = threading.current_thread().name
        assert teacher_threads == ([main, "teacher-ahead_0", "teacher-ahead_0"] if thread else [main] * 3)
    plain = results[False, False, False]
    for run in list(results.values())[1:]:
        for (loss_a, grad_a), (loss_b, grad_b) in zip(plain, run):
            assert loss_a.keys() == loss_b.keys()
            assert all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a)
            assert len(grad_a) == len(grad_b) and all(torch.equal(a, b) for a, b in zip(grad_a, grad_b))
    # a queued output is used only for the very tensors it was computed on
    student = _tiny_model(seed=1).train()
    loss_fn = RunAhead(_objective(teacher, student))
    loss_fn.upcoming = (batches[1], None)
    loss_fn(student, batches[0], None, _targets())
    calls.clear()
    loss_fn._teacher_output(batches[1].clone(), None)  # equal values, other tensor: computed anew
    assert len(calls) == 1


def test_no_assignment_is_collected_before_the_next_teachers_forward_is_queued(monkeypatch):
    """On a GPU a collected assignment holds the host until the GPU has run everything queued before its host
    copy. A DETRDistill step run ahead (accel.RunAhead) starts all three (the teacher's to the ground truth,
    the student's, the teacher-student one) before it queues the teacher's forward on the next batch, and
    collects each only after: the teacher's next forward and the other terms are queued without the host
    waiting. The solves themselves ran on the helper thread (the GPU's way, forced here on the CPU)."""
    import threading
    import trainers.accel.host as host_module
    import trainers.distill.logits as logits_module
    import trainers.matching as matching_module
    from trainers.accel.teacher_ahead import RunAhead
    monkeypatch.setattr(host_module, "solve_in_background", lambda device: True)
    events, solvers = [], set()

    def recording(start, name):
        def started(solve, *tensors):
            def solve_here(*host):
                solvers.add(threading.current_thread().name)
                return solve(*host)
            events.append(f"start {name}")
            wait = start(solve_here, *tensors)

            def collected():
                events.append(f"wait {name}")
                return wait()
            return collected
        return started
    start = matching_module.start_on_host
    monkeypatch.setattr(matching_module, "start_on_host", recording(start, "gt"))
    monkeypatch.setattr(logits_module, "start_on_host", recording(start, "kd"))
    teacher, student = _tiny_model(), _tiny_model(seed=1).train()
    loss_fn = RunAhead(_objective(teacher, student))
    batches = [torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    loss_fn.upcoming = (batches[1], None)
    loss_fn(student, batches[0], None, _targets())
    teacher.register_forward_hook(lambda module, args, out: events.append("teacher"))
    events.clear()
    loss_fn(student, batches[1], None, _targets())["loss"].backward()
    # the second step's teacher output was queued by the first: no teacher forward, then the same order
    assert events == ["start gt", "start gt", "start kd", "wait gt", "wait gt", "wait kd"]
    events.clear()
    loss_fn.upcoming = (batches[1], None)
    loss_fn(student, batches[0], None, _targets())
    assert events == ["teacher", "start gt", "start gt", "start kd", "teacher", "wait gt", "wait gt", "wait kd"]
    assert solvers == {"kd-solve_0"}


# operators whose output (or its size) a GPU computes only by reading device values back to the host: each
# makes the host wait for every kernel queued before it
READS_BACK = {"_local_scalar_dense", "bincount", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
              "unique_consecutive", "repeat_interleave", "is_nonzero", "equal"}


@pytest.mark.parametrize("family", ["conditional_detr", "deformable_detr", "adamixer"])
def test_a_distillation_step_reads_nothing_back_from_the_device(family):
    """A DETRDistill step's forward, losses and backward dispatch no operator that on a GPU reads device
    values back (torch.bincount of the match counts did: its CUDA kernel reads the input's min and max) and
    no boolean-mask indexing (a nonzero), in the plain objective's order or run ahead. The host's own work
    (assignments, match indices) stays out of torch. Counted on the CPU: the same operators a GPU step
    dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from trainers.accel.teacher_ahead import RunAhead

    class ReadBacks(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            masks = name.startswith("index") and any(torch.is_tensor(i) and i.dtype == torch.bool
                                                     for i in (args[1] if len(args) > 1 and isinstance(
                                                         args[1], (list, tuple)) else ()))
            if name in READS_BACK or masks:
                self.found.append(name)
            return func(*args, **(kwargs or {}))
    kw = dict(encoder_layers=0, num_feature_levels=3) if family == "adamixer" else {}
    teacher = _tiny_model(family, **kw)
    student = _tiny_model(family, seed=1, **kw).train()
    objective = _objective(teacher, student)
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    objective(student, images, None, _targets())  # first call: lazily built state
    run_ahead = RunAhead(objective)
    with ReadBacks() as mode:
        objective(student, images, None, _targets())["loss"].backward()
        run_ahead.upcoming = (images, None)
        run_ahead(student, images, None, _targets())["loss"].backward()
    assert mode.found == []
    # the mode sees the operators that read back
    with ReadBacks() as mode:
        torch.bincount(torch.tensor([0, 2]), minlength=3)
        images[images > 0]
    assert mode.found == ["bincount", "index"]


def test_teacher_thread_reports_the_teachers_error_at_the_next_step():
    """A teacher forward that fails on the helper thread fails the step that uses its output, with its own
    error, and the teacher runs in line again afterwards."""
    from trainers.accel.teacher_ahead import RunAhead
    teacher, student = _tiny_model(), _tiny_model(seed=1).train()
    loss_fn = RunAhead(_objective(teacher, student), thread=True)
    images = [torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def broken(module, args):
        raise RuntimeError("teacher broke")
    loss_fn.upcoming = (images[1], None)
    loss_fn(student, images[0], None, _targets())
    handle = teacher.register_forward_pre_hook(broken)
    loss_fn._queue(images[0], None)  # started, fails on the helper thread
    with pytest.raises(RuntimeError, match="teacher broke"):
        loss_fn(student, images[0], None, _targets())
    handle.remove()
    assert torch.isfinite(loss_fn(student, images[1], None, _targets())["loss"])


@pytest.mark.parametrize("split", ["all", "positive_negative"])
def test_kd_solve_in_the_background_matches_and_reports_errors_as_in_line(monkeypatch, split):
    """The helper thread's assignment is the in-line one (both splits), and a NaN prediction still ends the
    step with the matching's NonFiniteCostError, raised where the caller collects the result."""
    import trainers.accel.host as host_module
    import trainers.distill.logits as logits_module
    from trainers.matching import NonFiniteCostError
    g = torch.Generator().manual_seed(0)
    s = DecoderPredictions(torch.randn(2, 2, 7, 4, generator=g), torch.rand(2, 2, 7, 4, generator=g) * 0.5 + 0.2,
                           torch.randn(2, 2, 7, 8, generator=g))
    t = DecoderPredictions(torch.randn(2, 2, 5, 4, generator=g) * 3, torch.rand(2, 2, 5, 4, generator=g) * 0.5 + 0.2,
                           torch.randn(2, 2, 5, 8, generator=g))
    cfg = LogitsKDConfig(split=split, threshold=0.5)
    results = {}
    for background in (False, True):
        monkeypatch.setattr(host_module, "solve_in_background", lambda device: background)
        results[background] = logits_module.logits_distillation(s, t, [0, 1], cfg)
        bad = DecoderPredictions(s.logits.clone(), s.boxes.clone(), s.hidden)
        bad.logits[1, 0, 3, 2] = float("nan")
        finish = logits_module.start_logits_distillation(bad, t, [0, 1], cfg)
        with pytest.raises(NonFiniteCostError, match="NaN or inf"):
            finish()
    assert results[False].keys() == results[True].keys()
    assert all(torch.equal(results[False][k], results[True][k]) for k in results[False])


def test_teacher_run_ahead_in_training_is_bitwise_the_plain_run(tiny_data_root, tmp_path_factory, monkeypatch):
    """The engine runs the teacher ahead (accel.RunAhead, handed the next batch) when overlap_teacher is on;
    with no random draws in the model (dropout 0) the trained weights are bitwise those of a run without it.
    "auto" is off on the CPU, and a plain student's objective never runs ahead."""
    from trainers.accel.teacher_ahead import RunAhead, runs_ahead
    base = tiny_distill_trial(tiny_data_root, tmp_path_factory)
    base = base.model_copy(update={"model": base.model.model_copy(update={"dropout": 0.0})})
    cpu = torch.device("cpu")
    objective = _objective(_tiny_model(), _tiny_model(seed=1))
    assert not runs_ahead(objective, base.runtime, cpu)  # auto
    assert not runs_ahead(DetectionLoss(objective.criterion), base.runtime.model_copy(update={"overlap_teacher": "on"}),
                          cpu)
    weights, queued = {}, []
    queue = RunAhead._queue
    monkeypatch.setattr(RunAhead, "_queue", lambda self, *a: (queued.append(1), queue(self, *a)))
    for mode in ("off", "on", "thread"):
        config = base.model_copy(update={"runtime": base.runtime.model_copy(update={"overlap_teacher": mode})})
        assert runs_ahead(objective, config.runtime, cpu) == (mode != "off")
        workdir = tmp_path_factory.mktemp(f"overlap-{mode}")
        queued.clear()
        run_trial(config, workdir, log=lambda s: None)
        assert len(queued) == (3 if mode != "off" else 0)  # 16 images in batches of 4: all but the last step
        weights[mode] = torch.load(workdir / "checkpoint.pt", weights_only=False)["model"]
    for mode in ("on", "thread"):
        assert weights[mode].keys() == weights["off"].keys()
        assert all(torch.equal(weights[mode][k], weights["off"][k]) for k in weights["off"]), mode


def test_compiled_distillation_compiles_student_and_teacher(tiny_data_root, tmp_path_factory, monkeypatch):
    """runtime.compile in a distillation trial: the student and the teacher both run compiled (dynamo's
    eager backend here: the same operators, so the trained weights are bitwise the eager run's)."""
    from torch._dynamo.utils import counters
    from trainers import accel
    config = tiny_distill_trial(tiny_data_root, tmp_path_factory)
    eager_dir = tmp_path_factory.mktemp("kd-eager")
    run_trial(config, eager_dir, log=lambda s: None)
    compiled_models = []

    def compile_eager(model):
        compiled_models.append(model)
        return torch.compile(model, backend="eager")
    monkeypatch.setattr(accel, "compile_model", compile_eager)
    counters.clear()
    compiled = config.model_copy(update={"runtime": config.runtime.model_copy(update={"compile": True})})
    workdir = tmp_path_factory.mktemp("kd-compiled")
    run_trial(compiled, workdir, log=lambda s: None)
    teacher, student = compiled_models  # the objective (and its teacher) is built before training starts
    assert not any(p.requires_grad for p in teacher.parameters()) and any(p.requires_grad for p in student.parameters())
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]
    eager = torch.load(eager_dir / "checkpoint.pt", weights_only=False)["model"]
    trained = torch.load(workdir / "checkpoint.pt", weights_only=False)["model"]
    assert eager.keys() == trained.keys() and all(torch.equal(eager[k], trained[k]) for k in eager)


@pytest.mark.parametrize("method", ["detrdistill", "fitnet", "fgd", "mgd"])
def test_distillation_trial_end_to_end(tiny_data_root, tmp_path_factory, method):
    config = tiny_distill_trial(tiny_data_root, tmp_path_factory, method)
    reports = []
    run_trial(config, tmp_path_factory.mktemp(method), report=lambda m, c: reports.append(m), log=lambda s: None)
    metrics = reports[-1]
    expected = {"detrdistill": ["train/kd_logits", "train/kd_feature", "train/kd_query_prior"]}.get(
        method, [f"train/kd_{method}"])
    for key in expected + ["train/loss_det", "AP"]:
        assert key in metrics and np.isfinite(metrics[key]), key


def test_all_terms_run_on_adamixer_teacher_and_student():
    """No AdaMixer-specific code in distill/: the same objective drives it through the contract."""
    teacher = _tiny_model("adamixer", encoder_layers=0, num_feature_levels=3)
    student = _tiny_model("adamixer", seed=1, encoder_layers=0, num_feature_levels=3, hidden_dim=32,
                          num_heads=4).train()
    # the query prior carries the teacher's content [N, d]: widths must match, so only it uses equal widths
    with pytest.raises(ValueError):
        _objective(teacher, student)(student, torch.randn(2, 3, 64, 80), None, _targets())
    student = _tiny_model("adamixer", seed=1, encoder_layers=0, num_feature_levels=3).train()
    losses = _objective(teacher, student)(student, torch.randn(2, 3, 64, 80), None, _targets())
    for key in ("kd_logits", "kd_feature", "kd_query_prior"):
        assert torch.isfinite(losses[key]) and losses[key] > 0, key
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_mixed_pair_deformable_teacher_adamixer_student():
    """Logits and feature terms work across families; the query prior cannot (a Deformable DETR query
    group has no boxes for AdaMixer) and the objective says so (validation refuses it earlier)."""
    teacher = _tiny_model("deformable_detr", num_feature_levels=3)
    student = _tiny_model("adamixer", seed=1, encoder_layers=0, num_feature_levels=3).train()
    images = torch.randn(2, 3, 64, 80)
    losses = _objective(teacher, student, query_prior={"weight": 0})(student, images, None, _targets())
    assert torch.isfinite(losses["kd_logits"]) and torch.isfinite(losses["kd_feature"])
    with pytest.raises(ValueError, match="boxes"):
        _objective(teacher, student)(student, images, None, _targets())


def test_teacher_cuda_graph_wraps_the_teacher_which_the_cpu_calls_as_it_is(tiny_data_root, tmp_path_factory):
    """runtime.teacher_cuda_graph: the objective's teacher is a GraphedTeacher (frozen, in eval mode like any
    teacher); off CUDA it calls the teacher as it is, output for output (the graphs themselves:
    tests/test_gpu.py -k graph)."""
    from trainers.distill import build_distillation_loss
    from trainers.accel.graphed_teacher import GraphedTeacher
    from trainers.models.output import tensors_in
    config = tiny_distill_trial(tiny_data_root, tmp_path_factory)
    cpu = torch.device("cpu")
    categories = [f"class {i}" for i in range(10)]
    plain = build_distillation_loss(config, SetCriterion(10), categories, cpu)
    graphed = build_distillation_loss(
        config.model_copy(update={"runtime": config.runtime.model_copy(update={"teacher_cuda_graph": True})}),
        SetCriterion(10), categories, cpu)
    assert isinstance(graphed.teacher, GraphedTeacher) and not isinstance(plain.teacher, GraphedTeacher)
    assert not graphed.teacher.training and not any(p.requires_grad for p in graphed.teacher.parameters())
    images, mask = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    with torch.no_grad():
        expected, got = plain.teacher(images, mask), graphed.teacher(images, mask)
    pairs = list(zip(tensors_in(expected), tensors_in(got), strict=True))
    assert len(pairs) >= 8 and all(torch.equal(a, b) for a, b in pairs)
    assert graphed.teacher.graphs == {} and graphed.teacher.seen == set()  # nothing captured on the CPU


def test_map_tensors_rebuilds_an_output_with_every_tensor_mapped():
    from trainers.models.output import map_tensors, tensors_in
    model = build_detector(ModelConfig(family="deformable_detr", backbone="resnet18", encoder_layers=1,
                                       decoder_layers=2, num_queries=5, hidden_dim=32, num_heads=4, ffn_dim=32,
                                       num_feature_levels=2), 3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    doubled = map_tensors(lambda t: t * 2, out)
    assert type(doubled) is type(out) and type(doubled.predictions) is type(out.predictions)
    assert type(doubled.features) is list and doubled.aux.keys() == out.aux.keys()
    pairs = list(zip(tensors_in(out), tensors_in(doubled), strict=True))
    assert len(pairs) > 10 and all(torch.equal(a * 2, b) for a, b in pairs)
