"""FitNet, FGD and MGD baselines against plain float64 references written from the papers' definitions."""

import pytest
import torch
import torch.nn.functional as F

from trainers.distill.baselines import (FGDLoss, FitNetLoss, MGDLoss, build_baseline,
                                                    foreground_background_masks)

B, D_S, D_T = 2, 6, 8
PADDED = (48, 40)                  # padded batch (H_pad, W_pad) in pixels
GRIDS = [(6, 5), (3, 3)]           # two levels, strides 8 and ~16
SIZES = [(48, 40), (32, 24)]       # unpadded (h, w) of each image: image 1 is padded


def level_masks():
    """DETR's convention: the pixel padding mask resized (nearest) to each level. -> list of [B, H, W]."""
    pix = torch.ones(B, *PADDED, dtype=torch.bool)
    for b, (h, w) in enumerate(SIZES):
        pix[b, :h, :w] = False
    return [F.interpolate(pix[None].float(), size=g)[0].bool() for g in GRIDS]


def make_targets():
    """Image 0: two overlapping boxes; image 1: one box (normalized to its own unpadded size)."""
    boxes = [torch.tensor([[0.40, 0.55, 0.50, 0.60], [0.45, 0.50, 0.15, 0.20]]),
             torch.tensor([[0.30, 0.40, 0.40, 0.50]])]
    return [{"boxes": bx.double(), "labels": torch.zeros(len(bx), dtype=torch.int64),
             "size": torch.tensor(sz, dtype=torch.int64)} for bx, sz in zip(boxes, SIZES)]


def make_features(seed=0, d_s=D_S, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(B, d_s, *grid, generator=g, dtype=torch.float64, requires_grad=requires_grad)
               for grid in GRIDS]
    teacher = [torch.randn(B, D_T, *grid, generator=g, dtype=torch.float64) for grid in GRIDS]
    return student, teacher


def randomize(module, seed=1):
    """Random parameters, so that zero-initialised layers (FGD's context blocks) count in the checks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def valid_cells(pad):
    """All (b, h, w) that are not padding."""
    return [tuple(i) for i in (~pad).nonzero().tolist()]


def conv1x1(conv, x):
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[None, :, None, None]


# --------------------------------------------------------------------------------------------- references

def ref_fitnet(module, student, teacher, masks):
    total = 0.0
    for j, (s, t, pad) in enumerate(zip(student, teacher, masks)):
        a = conv1x1(module.adapters[j], s)
        cells = valid_cells(pad)
        total += sum(((a[b, :, h, w] - t[b, :, h, w]) ** 2).sum() for b, h, w in cells) / (len(cells) * D_T)
    return module.weight * total


def ref_fg_mask(target, grid):
    """A cell (column x, row y) covers [x, x+1) x [y, y+1) in feature units; it is foreground for a box when
    the two overlap with positive area; value = max over boxes of 1 / (cells of the box)."""
    H, W = grid
    h, w = target["size"].tolist()
    out = torch.zeros(H, W, dtype=torch.float64)
    for cx, cy, bw, bh in target["boxes"].tolist():
        x0, x1 = (cx - bw / 2) * w * W / PADDED[1], (cx + bw / 2) * w * W / PADDED[1]
        y0, y1 = (cy - bh / 2) * h * H / PADDED[0], (cy + bh / 2) * h * H / PADDED[0]
        cells = [(y, x) for y in range(H) for x in range(W)
                 if x < x1 - 1e-9 and x + 1 > x0 + 1e-9 and y < y1 - 1e-9 and y + 1 > y0 + 1e-9]
        for y, x in cells:
            out[y, x] = max(out[y, x], 1.0 / len(cells))
    return out


def ref_attention(f, cells, temp):
    """f [C, H, W] of one image -> spatial {(h, w): value}, channel [C]."""
    C = f.shape[0]
    g_s = {(h, w): f[:, h, w].abs().mean() / temp for h, w in cells}
    z = sum(torch.exp(v) for v in g_s.values())
    spatial = {k: len(cells) * torch.exp(v) / z for k, v in g_s.items()}
    g_c = sum(f[:, h, w].abs() for h, w in cells) / len(cells) / temp
    channel = C * torch.exp(g_c) / torch.exp(g_c).sum()
    return spatial, channel


def ref_context(block, f, cells):
    """GcBlock on one image f [C, H, W] -> [C, H, W]."""
    logits = {(h, w): block.key.weight[0, :, 0, 0] @ f[:, h, w] + block.key.bias[0] for h, w in cells}
    z = sum(torch.exp(v) for v in logits.values())
    context = sum(torch.exp(logits[k]) / z * f[:, k[0], k[1]] for k in cells)
    c1, ln, _, c2 = block.transform
    y = c1.weight[:, :, 0, 0] @ context + c1.bias
    y = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + ln.eps) * ln.weight.flatten() + ln.bias.flatten()
    y = c2.weight[:, :, 0, 0] @ torch.relu(y) + c2.bias
    return f + y[:, None, None]


def ref_fgd(module, student, teacher, masks, targets):
    total = 0.0
    for j, (s, t, pad) in enumerate(zip(student, teacher, masks)):
        s = conv1x1(module.align[j], s) if isinstance(module.align[j], torch.nn.Conv2d) else s
        for b in range(B):
            cells = [(h, w) for bb, h, w in valid_cells(pad) if bb == b]
            fg = ref_fg_mask(targets[b], GRIDS[j])
            bg_cells = [c for c in cells if fg[c] == 0]
            sp_t, ch_t = ref_attention(t[b], cells, module.temperature)
            sp_s, ch_s = ref_attention(s[b], cells, module.temperature)
            rel_s = ref_context(module.context_student[j], s[b], cells)
            rel_t = ref_context(module.context_teacher[j], t[b], cells)
            focal = lambda c: (sp_t[c] * ch_t * (s[b, :, c[0], c[1]] - t[b, :, c[0], c[1]]) ** 2).sum()
            fg_loss = sum(fg[c] * focal(c) for c in cells)
            bg_loss = sum(focal(c) / len(bg_cells) for c in bg_cells)
            att = sum(abs(sp_s[c] - sp_t[c]) for c in cells) + (ch_s - ch_t).abs().sum()
            glob = sum(((rel_s[:, h, w] - rel_t[:, h, w]) ** 2).sum() for h, w in cells)
            total += (module.alpha * fg_loss + module.beta * bg_loss + module.gamma * att
                      + module.lam * glob) / B
    return total


def ref_mgd(module, student, teacher, masks, seed):
    """Replays the documented draw: one torch.rand(B, 1, H, W) float32 per level, kept where <= 1 - ratio."""
    torch.manual_seed(seed)
    total = 0.0
    for j, (s, t, pad) in enumerate(zip(student, teacher, masks)):
        s = conv1x1(module.align[j], s) if isinstance(module.align[j], torch.nn.Conv2d) else s
        keep = (torch.rand(B, 1, *GRIDS[j], dtype=torch.float32) <= 1 - module.mask_ratio).double()
        x = s * keep * (~pad).double()[:, None]
        c1, _, c2 = module.generation[j]
        gen = F.conv2d(torch.relu(F.conv2d(x, c1.weight, c1.bias, padding=1)), c2.weight, c2.bias, padding=1)
        total += sum(((gen[b, :, h, w] - t[b, :, h, w]) ** 2).sum() for b, h, w in valid_cells(pad)) / B
    return module.weight * total


# -------------------------------------------------------------------------------------------------- tests

def test_fitnet_matches_reference():
    module = FitNetLoss(D_S, D_T, len(GRIDS)).double()
    student, teacher = make_features()
    masks = level_masks()
    loss = module(student, teacher, masks, make_targets(), PADDED)
    torch.testing.assert_close(loss, ref_fitnet(module, student, teacher, masks), rtol=1e-10, atol=0)


@pytest.mark.parametrize("term, d_s", [("alpha", D_S), ("beta", D_S), ("gamma", D_S), ("lam", D_S),
                                        ("all", D_S), ("all", D_T)])
def test_fgd_matches_reference(term, d_s):
    """Each term on its own (so a small one cannot hide in the sum), then all with the paper's weights."""
    module = randomize(FGDLoss(d_s, D_T, len(GRIDS))).double()
    if term != "all":
        for name in ("alpha", "beta", "gamma", "lam"):
            setattr(module, name, float(name == term))
    student, teacher = make_features(d_s=d_s)
    masks, targets = level_masks(), make_targets()
    loss = module(student, teacher, masks, targets, PADDED)
    torch.testing.assert_close(loss, ref_fgd(module, student, teacher, masks, targets), rtol=1e-9, atol=0)


@pytest.mark.parametrize("d_s", [D_S, D_T])
def test_mgd_matches_reference_with_same_draw(d_s):
    module = MGDLoss(d_s, D_T, len(GRIDS)).double()
    student, teacher = make_features(d_s=d_s)
    masks = level_masks()
    torch.manual_seed(3)
    loss = module(student, teacher, masks, make_targets(), PADDED)
    torch.testing.assert_close(loss, ref_mgd(module, student, teacher, masks, seed=3), rtol=1e-10, atol=0)


def test_mgd_randomness_follows_global_seed():
    module = MGDLoss(D_S, D_T, len(GRIDS)).double()
    student, teacher = make_features()
    masks = level_masks()
    run = lambda seed: (torch.manual_seed(seed), module(student, teacher, masks, None, PADDED))[1]
    assert run(5) == run(5)
    assert run(5) != run(6)
    # mask ratio 0: nothing is dropped, so the draw no longer matters
    module.mask_ratio = 0.0
    assert run(5) == run(6)


def test_zero_loss_when_student_equals_teacher():
    student, teacher = make_features(d_s=D_T)
    teacher = [s.detach().clone() for s in student]
    masks, targets = level_masks(), make_targets()
    fitnet = FitNetLoss(D_T, D_T, len(GRIDS)).double()
    with torch.no_grad():
        for a in fitnet.adapters:
            a.weight.copy_(torch.eye(D_T)[:, :, None, None])
            a.bias.zero_()
    assert fitnet(student, teacher, masks, targets, PADDED) == 0
    # FGD: no adapter at equal widths, and both context blocks start as the identity
    fgd = FGDLoss(D_T, D_T, len(GRIDS)).double()
    assert fgd(student, teacher, masks, targets, PADDED) == 0


@pytest.mark.parametrize("method", ["fitnet", "fgd", "mgd"])
def test_gradients_reach_student_and_parameters_not_teacher(method):
    module = randomize(build_baseline(method, D_S, D_T, len(GRIDS), None)).double()
    student, _ = make_features(requires_grad=True)
    # the teacher maps come with a graph on purpose: the loss must cut it
    teacher_leaf = [torch.randn(B, D_T, *g, dtype=torch.float64, requires_grad=True) for g in GRIDS]
    teacher = [2 * t for t in teacher_leaf]
    torch.manual_seed(0)
    module(student, teacher, level_masks(), make_targets(), PADDED).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher_leaf)
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        if name.endswith("key.bias"):  # adds one constant to every softmax logit: no effect, zero gradient
            assert p.grad.abs().max() < 1e-12, name
        else:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", ["fitnet", "fgd", "mgd"])
def test_padding_is_ignored(method):
    """Whatever sits at padded positions of either map changes nothing."""
    module = randomize(build_baseline(method, D_S, D_T, len(GRIDS), None)).double()
    student, teacher = make_features()
    masks, targets = level_masks(), make_targets()
    torch.manual_seed(0)
    before = module(student, teacher, masks, targets, PADDED)
    noisy = lambda xs: [x + 50 * torch.randn_like(x) * m[:, None] for x, m in zip(xs, masks)]
    student, teacher = noisy(student), noisy(teacher)
    torch.manual_seed(0)
    after = module(student, teacher, masks, targets, PADDED)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=0)


@pytest.mark.parametrize("size", SIZES)
def test_foreground_mask_covers_exactly_an_aligned_box(size):
    """Box x in [8, 24) px, y in [16, 40) px: cells 1..2 x 2..4 at stride 8, whether or not the image is
    padded (the box is normalized to the unpadded size, the grid spans the padded batch)."""
    h, w = size
    box = torch.tensor([[16 / w, 28 / h, 16 / w, 24 / h]], dtype=torch.float64)
    targets = [{"boxes": box, "size": torch.tensor(size)}]
    pad = torch.zeros(1, *GRIDS[0], dtype=torch.bool)
    fg, bg = foreground_background_masks(targets, pad, PADDED, torch.float64)
    expected = torch.zeros(1, *GRIDS[0], dtype=torch.float64)
    expected[0, 2:5, 1:3] = 1 / 6
    torch.testing.assert_close(fg, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(bg, (expected == 0).double() / 24, rtol=0, atol=1e-15)


def test_foreground_never_on_padding():
    """Masks resized from the pixel mask never put a box on padding; a hand-made mask still must win."""
    box = torch.tensor([[16 / 40, 28 / 48, 16 / 40, 24 / 48]], dtype=torch.float64)
    pad = torch.zeros(1, *GRIDS[0], dtype=torch.bool)
    pad[0, :, 2:] = True
    fg, bg = foreground_background_masks([{"boxes": box, "size": torch.tensor(PADDED)}], pad, PADDED,
                                         torch.float64)
    expected = torch.zeros(1, *GRIDS[0], dtype=torch.float64)
    expected[0, 2:5, 1] = 1 / 6  # the box still counts its 6 cells; only the 3 valid ones remain
    torch.testing.assert_close(fg, expected, rtol=0, atol=1e-15)
    assert bg[pad].sum() == 0 and bg.sum() == pytest.approx(1.0)


def test_masks_match_reference_and_respect_padding():
    masks, targets = level_masks(), make_targets()
    for j, pad in enumerate(masks):
        fg, bg = foreground_background_masks(targets, pad, PADDED, torch.float64)
        for b in range(B):
            torch.testing.assert_close(fg[b], ref_fg_mask(targets[b], GRIDS[j]) * ~pad[b], rtol=0, atol=1e-15)
            assert bg[b][pad[b]].abs().sum() == 0 and fg[b][pad[b]].abs().sum() == 0
            torch.testing.assert_close(bg[b].sum(), torch.tensor(1.0, dtype=torch.float64))
            assert ((fg[b] > 0) & (bg[b] > 0)).sum() == 0
    # image 0: the smaller box sits inside the larger one and keeps its larger 1/area
    fg, _ = foreground_background_masks(targets, masks[0], PADDED, torch.float64)
    assert fg[0].max() > fg[0][fg[0] > 0].min()


def test_image_without_boxes_is_all_background():
    targets = [{"boxes": torch.zeros(0, 4), "size": torch.tensor(s)} for s in SIZES]
    fg, bg = foreground_background_masks(targets, level_masks()[0], PADDED)
    assert fg.sum() == 0
    torch.testing.assert_close(bg.sum(dim=(1, 2)), torch.ones(B))


def test_build_and_default_weights():
    assert build_baseline("fitnet", D_S, D_T, 2, None).weight == 1.0
    fgd = build_baseline("fgd", D_S, D_T, 2, None)
    assert (fgd.weight, fgd.alpha, fgd.beta, fgd.gamma, fgd.lam, fgd.temperature) == (1e-3, 1e-3, 5e-4, 5e-4,
                                                                                       5e-6, 0.5)
    mgd = build_baseline("mgd", D_S, D_T, 2, None)
    assert (mgd.weight, mgd.mask_ratio) == (2e-5, 0.65)
    assert build_baseline("mgd", D_S, D_T, 2, 0.5).weight == 0.5
    assert build_baseline("fgd", D_S, D_T, 2, 2e-3).lam == pytest.approx(1e-5)
    with pytest.raises(ValueError):
        build_baseline("kd", D_S, D_T, 2, None)
    with pytest.raises(ValueError):
        build_baseline("fitnet", D_S, D_T, 3, None)(*make_features(), level_masks(), make_targets(), PADDED)


@pytest.mark.parametrize("method", ["fitnet", "fgd", "mgd"])
def test_bf16_autocast_gives_float32_loss(method):
    module = build_baseline(method, D_S, D_T, len(GRIDS), None)
    student, teacher = make_features()
    student, teacher = [s.float() for s in student], [t.float() for t in teacher]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(student, teacher, level_masks(), make_targets(), PADDED)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
