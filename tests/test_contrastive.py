"""The contrastive term against a hand computation: InfoNCE by a direct loop over pairs, in float64."""
import math

import torch

from trainers.distill.contrastive import ContrastiveHead, contrastive_distillation, info_nce


def _matches(g, layers, batch, n_s, n_t):
    """Per (pair, image): a random one-to-one matching of min(n_s, n_t) student and teacher queries, rows sorted."""
    out = []
    for _ in range(layers * batch):
        k = min(n_s, n_t)
        rows = torch.randperm(n_s, generator=g)[:k].sort().values
        out.append((rows, torch.randperm(n_t, generator=g)[:k]))
    return out


def _loop_info_nce(z_s, z_t, temperature):
    """-1/K sum_k log( exp(<t_k, s_k>/T) / sum_j exp(<t_k, s_j>/T) ), one pair at a time, in float64."""
    z_s, z_t = z_s.detach().double(), z_t.detach().double()
    total = 0.0
    for k in range(len(z_s)):
        num = math.exp(float(z_t[k] @ z_s[k]) / temperature)
        den = sum(math.exp(float(z_t[k] @ z_s[j]) / temperature) for j in range(len(z_s)))
        total -= math.log(num / den)
    return total / len(z_s)


def test_info_nce_is_the_loop():
    g = torch.Generator().manual_seed(0)
    z_s = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=1)
    z_t = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=1)
    assert abs(float(info_nce(z_s, z_t, 0.07)) - _loop_info_nce(z_s, z_t, 0.07)) < 1e-4


def _setup(seed=0, layers_s=2, layers_t=3, batch=2, n_s=5, n_t=6, d_s=8, d_t=12):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = ContrastiveHead(d_s, d_t, dim=16)
    s = torch.randn(layers_s, batch, n_s, d_s, generator=g)
    t = torch.randn(layers_t, batch, n_t, d_t, generator=g)
    return head, s, t, _matches(g, layers_s, batch, n_s, n_t)


def test_equals_a_hand_computation_per_layer_pair():
    head, s, t, matches = _setup()
    mapping, batch = [1, 2], s.shape[1]
    got = contrastive_distillation(head, s, t, mapping, matches, weight=0.2, temperature=0.07)["kd_contrastive"]
    expected = 0.0
    for pair, layer_t in enumerate(mapping):
        rows_s, rows_t = [], []
        for b in range(batch):  # the matched pairs of every image, image by image
            r, c = matches[pair * batch + b]
            rows_s += [s[pair, b, i] for i in r]
            rows_t += [t[layer_t, b, j] for j in c]
        z_s, z_t = head(torch.stack(rows_s), torch.stack(rows_t))
        expected += _loop_info_nce(z_s, z_t, 0.07)
    assert abs(float(got) - 0.2 * expected) < 1e-4 * max(1.0, expected)


def test_invariant_to_one_permutation_of_both_sides_queries():
    head, s, t, matches = _setup(seed=1)
    before = float(contrastive_distillation(head, s, t, [0, 1], matches, 1.0, 0.07)["kd_contrastive"])
    g = torch.Generator().manual_seed(7)
    perm_s, perm_t = torch.randperm(s.shape[2], generator=g), torch.randperm(t.shape[2], generator=g)
    inv_s, inv_t = perm_s.argsort(), perm_t.argsort()  # new position of each old query
    moved = [(inv_s[r], inv_t[c]) for r, c in matches]
    order = [r.argsort() for r, _ in moved]  # the solver returns rows sorted; so do these
    moved = [(r[o], c[o]) for (r, c), o in zip(moved, order)]
    after = float(contrastive_distillation(head, s[:, :, perm_s], t[:, :, perm_t], [0, 1], moved, 1.0,
                                           0.07)["kd_contrastive"])
    assert abs(before - after) < 1e-5 * max(1.0, before)


def test_follows_the_layer_mapping():
    """Mapping student layer 0 to teacher layer 2 is the same as giving only teacher layer 2 with mapping [0];
    and another teacher layer gives another loss."""
    head, s, t, matches = _setup(seed=2, layers_s=1)
    to_last = contrastive_distillation(head, s, t, [2], matches, 1.0, 0.07)["kd_contrastive"]
    only_last = contrastive_distillation(head, s, t[2:], [0], matches, 1.0, 0.07)["kd_contrastive"]
    to_first = contrastive_distillation(head, s, t, [0], matches, 1.0, 0.07)["kd_contrastive"]
    assert torch.equal(to_last, only_last)
    assert abs(float(to_last) - float(to_first)) > 1e-3


def test_trains_the_heads_and_the_student_not_the_teacher():
    head, s, t, matches = _setup(seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    contrastive_distillation(head, s, t, [1, 2], matches, 0.2, 0.07)["kd_contrastive"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    assert all(p.grad is not None for p in head.parameters())
