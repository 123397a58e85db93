"""AdaMixer behind the detector contract: the 3D sampling and adaptive mixing against float64 per-point loops,
shapes, the extra query group, gradients, build_detector, and one epoch through the generic engine."""
import copy
import itertools
import math

import pytest
import torch
from pydantic import ValidationError

from trainers.config import AugmentConfig, DataConfig, ModelConfig, RuntimeConfig, ScheduleConfig, TrialConfig
from trainers.checkpoint import load_detector
from trainers.engine import run_trial
from trainers.models import QueryGroup, build_detector
from trainers.models.adamixer import AdaMixer
from trainers.models.adamixer_ops import (AdaptiveSamplingMixing, channel_mixing, sample_3d,
                                                     sampling_points, spatial_mixing)

C, D = 3, 32
F64 = torch.float64


# ---------------------------------------------------------------- operators against per-point loops


def reference_sample_3d(features, strides, points, groups, tau=2.0):
    """One point, one level, one corner at a time: bilinear (cell k centred at (k + .5) * stride, zero
    outside the map), Gaussian level weights softmax(-(z - log2 stride)^2 / tau)."""
    B, N, K, _ = points.shape
    P, cg = K // groups, features[0].shape[1] // groups
    out = torch.zeros(B, N, groups, P, cg, dtype=F64)
    for b in range(B):
        for n in range(N):
            for k in range(K):
                g, p = divmod(k, P)
                x, y, z = points[b, n, k].tolist()
                logit = [-(z - math.log2(s)) ** 2 / tau for s in strides]
                weight = [math.exp(v - max(logit)) for v in logit]
                weight = [v / sum(weight) for v in weight]
                for f, s, w in zip(features, strides, weight):
                    H, W = f.shape[-2:]
                    u, v = x / s - 0.5, y / s - 0.5
                    u0, v0 = math.floor(u), math.floor(v)
                    for row, wy in ((v0, 1 - (v - v0)), (v0 + 1, v - v0)):
                        for col, wx in ((u0, 1 - (u - u0)), (u0 + 1, u - u0)):
                            if 0 <= row < H and 0 <= col < W:
                                out[b, n, g, p] += w * wy * wx * f[b, g * cg:(g + 1) * cg, row, col]
    return out


def reference_mix(x, weight, spatial):
    """ReLU(LayerNorm over the whole block(x @ weight)) (or weight @ x when spatial), scalar loops."""
    lead = x.shape[:-2]
    rows, inner, cols = (weight.shape[-2], x.shape[-2], x.shape[-1]) if spatial else \
        (x.shape[-2], x.shape[-1], weight.shape[-1])
    out = torch.zeros(*lead, rows, cols, dtype=F64)
    for idx in itertools.product(*[range(s) for s in lead]):
        xi, wi = x[tuple(idx)].tolist(), weight[tuple(idx)].tolist()
        block = [[sum((wi[r][i] * xi[i][c]) if spatial else (xi[r][i] * wi[i][c]) for i in range(inner))
                  for c in range(cols)] for r in range(rows)]
        flat = [v for row in block for v in row]
        mean = sum(flat) / len(flat)
        var = sum((v - mean) ** 2 for v in flat) / len(flat)
        out[tuple(idx)] = torch.tensor([[max(0.0, (v - mean) / math.sqrt(var + 1e-5)) for v in row]
                                        for row in block], dtype=F64)
    return out


def test_sampling_points_and_3d_sampling_match_loops():
    g = torch.Generator().manual_seed(0)
    B, N, G, P, Cf = 2, 3, 2, 5, 6
    strides, canvas = [8, 16, 32], (40, 72)  # maps 5x9, 3x5, 2x3: ceil sizes, the canvas edge inside a cell
    features = [torch.randn(B, Cf, math.ceil(canvas[0] / s), math.ceil(canvas[1] / s), generator=g, dtype=F64)
                for s in strides]
    # centres anywhere on the canvas, scales 4 to 64 px, aspects 1/2 to 2
    xyzr = torch.rand(B, N, 4, generator=g, dtype=F64) * torch.tensor([72.0, 40.0, 4.0, 2.0], dtype=F64) \
        + torch.tensor([0.0, 0.0, 2.0, -1.0], dtype=F64)
    offsets = torch.randn(B, N, G * P, 3, generator=g, dtype=F64) * 0.7  # some points fall outside the maps
    points = sampling_points(offsets, xyzr)
    for b in range(B):
        for n in range(N):
            x, y, z, r = xyzr[b, n].tolist()
            w, h = 2 ** (z - r / 2), 2 ** (z + r / 2)
            for k in range(G * P):
                dx, dy, dz = offsets[b, n, k].tolist()
                expect = torch.tensor([x + dx * w, y + dy * h, z + dz], dtype=F64)
                torch.testing.assert_close(points[b, n, k], expect, rtol=0, atol=1e-12)
    # the edge cases by hand: far outside every map, across the canvas edge, depths beyond the pyramid
    points[0, 0, 0], points[1, 2, 3] = torch.tensor([-200.0, 10.0, 4.0]), torch.tensor([30.0, 300.0, 9.0])
    points[0, 1, 1], points[1, 0, 2] = torch.tensor([71.0, 39.5, 1.0]), torch.tensor([-3.0, -2.0, 5.5])
    out = sample_3d(features, strides, points, G)
    ref = reference_sample_3d(features, strides, points, G)
    assert out.shape == (B, N, G, P, Cf // G) and out.dtype == F64
    assert (ref == 0).all(-1).any() and not (ref == 0).all()  # both outside and inside points were drawn
    err = (out - ref).abs().max().item()
    print(f"sample_3d max |err| vs float64 loops: {err:.3g}")
    assert err < 1e-12


@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "spatial"])
def test_mixing_matches_loops(spatial):
    g = torch.Generator().manual_seed(1)
    B, N, G, P_in, P_out, c = 2, 3, 2, 4, 5, 3
    x = torch.randn(B, N, G, P_in, c, generator=g, dtype=F64)
    if spatial:
        weight = torch.randn(B, N, G, P_out, P_in, generator=g, dtype=F64)
        out = spatial_mixing(x, weight)
        assert out.shape == (B, N, G, P_out, c)
    else:
        weight = torch.randn(B, N, G, c, c + 1, generator=g, dtype=F64)
        out = channel_mixing(x, weight)
        assert out.shape == (B, N, G, P_in, c + 1)
    err = (out - reference_mix(x, weight, spatial)).abs().max().item()
    print(f"{'spatial' if spatial else 'channel'}_mixing max |err| vs float64 loops: {err:.3g}")
    assert err < 1e-12


def test_sampling_mixing_module_matches_loops():
    """The module's layout (group-major offsets and mixer weights, [G, P_out, C_g] flattening) against the
    per-query loops above, in float64, with content-dependent generators."""
    torch.manual_seed(2)
    B, N, d, G, P, Q = 2, 2, 8, 2, 3, 4
    module = AdaptiveSamplingMixing(d, G, P, Q).double()
    module.reset_parameters()
    with torch.no_grad():
        module.offset_generator.weight.normal_(0, 0.3)
        module.mixing_generator.weight.normal_(0, 0.3)
    strides = [8, 16]
    features = [torch.randn(B, d, 6, 8, dtype=F64), torch.randn(B, d, 3, 4, dtype=F64)]
    content = torch.randn(B, N, d, dtype=F64)
    xyzr = torch.tensor([[[20.0, 15.0, 3.5, 0.3], [40.0, 30.0, 4.5, -0.5]]], dtype=F64).repeat(B, 1, 1)
    out = module(content, xyzr, features, strides)
    c = d // G
    ref = torch.empty(B, N, d, dtype=F64)
    with torch.no_grad():
        for b in range(B):
            for n in range(N):
                q = content[b, n]
                offsets = (module.offset_generator.weight @ q + module.offset_generator.bias).view(1, 1, G * P, 3)
                sampled = reference_sample_3d([f[b:b + 1] for f in features], strides,
                                              sampling_points(offsets, xyzr[b:b + 1, n:n + 1]), G)[0, 0]
                params = (module.mixing_generator.weight @ q + module.mixing_generator.bias).view(G, -1)
                mixed = torch.stack([
                    reference_mix(reference_mix(sampled[g][None], params[g, :c * c].view(1, c, c), False),
                                  params[g, c * c:].view(1, Q, P), True)[0] for g in range(G)])  # [G, Q, c]
                y = q + module.out_proj.weight @ mixed.flatten() + module.out_proj.bias
                ref[b, n] = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + 1e-5) * module.norm.weight \
                    + module.norm.bias
    err = (out - ref).abs().max().item()
    print(f"AdaptiveSamplingMixing max |err| vs float64 loops: {err:.3g}")
    assert err < 1e-12


# ---------------------------------------------------------------- the detector


def make(stages=2, levels=4, queries=6, dropout=0.0, seed=0, perturb=False, finest_stride=None):
    """A tiny AdaMixer (small mixers: G=2, P_in=4, P_out=6); perturb = fill zero-initialised weights (box
    head, offset and mixing generators) so boxes move and gradients reach everything."""
    torch.manual_seed(seed)
    cfg = ModelConfig(family="adamixer", backbone="resnet18", decoder_layers=stages, num_queries=queries,
                      hidden_dim=D, num_heads=2, ffn_dim=48, num_feature_levels=levels, dropout=dropout,
                      finest_stride=finest_stride)
    model = AdaMixer(cfg, C, groups=2, in_points=4, out_points=6)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.05)
    return model


def batch(B=2, H=64, W=96):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, 40:, :] = True  # second image is 40 x 64 inside a 64 x 96 batch
    mask[1, :, 64:] = True
    return images, mask


@pytest.mark.parametrize("stages,levels,queries", [(1, 3, 5), (3, 4, 7), (1, 1, 4)])
def test_shapes_and_whole_image_start(stages, levels, queries):
    model = make(stages, levels, queries).eval()
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask)
    B, N = 2, queries
    assert out.logits.shape == (stages, B, N, C)
    assert out.boxes.shape == (stages, B, N, 4)
    assert out.hidden.shape == (stages, B, N, D)
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2)]  # strides 8, 16, 32 and a stride-2 conv on 2 x 3
    sizes = sizes[3 - levels:3] if levels < 4 else sizes
    assert [tuple(f.shape) for f in out.features] == [(B, D, h, w) for h, w in sizes]
    assert [tuple(m.shape) for m in out.masks] == [(B, h, w) for h, w in sizes]
    assert not any(m[0].any() for m in out.masks) and out.masks[0][1].any()
    assert out.memory.shape == (B, sum(h * w for h, w in sizes), D)
    assert out.queries.content.shape == (N, D) and out.queries.boxes.shape == (N, 4)
    assert out.extra is None
    # the box head starts at zero: every stage predicts each image's whole image, padded or not
    torch.testing.assert_close(out.boxes, torch.tensor([0.5, 0.5, 1.0, 1.0]).expand_as(out.boxes))
    assert all(torch.allclose(s.class_head.bias, torch.full((C,), -4.59512), atol=1e-4) for s in model.stages)
    with torch.no_grad():  # the no-mask call treats everything as image
        assert torch.equal(model(images).logits, model(images, torch.zeros_like(mask)).logits)


@pytest.mark.parametrize("levels", [4, 5])
def test_c2_pyramid_as_the_official(levels):
    """finest_stride 4: C2-C5 (the official AdaMixer's pyramid), then stride-2 convs for more levels."""
    model = make(2, levels, 5, perturb=True, finest_stride=4).eval()
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask)
    assert model.strides == [4, 8, 16, 32, 64][:levels]
    sizes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)][:levels]
    assert [tuple(f.shape[-2:]) for f in out.features] == sizes and out.masks[0][1].any()
    assert torch.isfinite(out.boxes).all() and out.boxes.shape == (2, 2, 5, 4)


def test_refined_boxes_are_normalized_by_each_image():
    model = make(2, 3, 5, perturb=True).eval()
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask)
    assert torch.isfinite(out.boxes).all() and (out.boxes[..., 2:] > 0).all()
    assert not torch.allclose(out.boxes[0], out.boxes[1])  # refinement moved them, stage by stage
    assert out.aux["image_sizes"].tolist() == [[96.0, 64.0], [64.0, 40.0]]


def test_extra_group_is_separate():
    model = make(stages=2, levels=3, perturb=True).eval()
    images, mask = batch()
    g = torch.Generator().manual_seed(5)
    extra = QueryGroup(content=torch.randn(4, D, generator=g),
                       boxes=torch.cat([torch.rand(4, 2, generator=g) * 0.6 + 0.2,
                                        torch.rand(4, 2, generator=g) * 0.4 + 0.1], 1))
    with torch.no_grad():
        plain = model(images, mask)
        both = model(images, mask, queries=extra)
        alone = copy.deepcopy(model)  # the same queries as some model's own, decoded alone
        alone.query_content = torch.nn.Embedding.from_pretrained(extra.content)
        alone.query_boxes = torch.nn.Embedding.from_pretrained(extra.boxes)
        ref = alone(images, mask)
    for a, b in ((plain.predictions, both.predictions), (ref.predictions, both.extra)):
        for name in ("logits", "boxes", "hidden"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5)
    assert both.extra.logits.shape == (2, 2, 4, C)
    with pytest.raises(ValueError, match="content .* and boxes .*lacks content and boxes"):
        model(images, mask, queries=QueryGroup(position=torch.randn(4, D)))
    with pytest.raises(ValueError, match="lacks boxes"):
        model(images, mask, queries=QueryGroup(content=extra.content))
    with pytest.raises(ValueError, match=r"got content \(4, 16\)"):
        model(images, mask, queries=QueryGroup(content=torch.randn(4, 16), boxes=extra.boxes))


def test_gradients_reach_all_trainable_parameters():
    model = make(stages=2, levels=4, perturb=True).train()
    images, mask = batch()
    teacher = QueryGroup(content=torch.randn(3, D), boxes=torch.tensor([[0.5, 0.5, 0.3, 0.4]]).repeat(3, 1))
    out = model(images, mask, queries=teacher)
    loss = sum(t.sum() for t in (out.logits, out.boxes, out.extra.logits, out.extra.boxes))
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert {"query_boxes.weight", "stages.0.iof_tau", "stages.1.sampling_mixing.offset_generator.weight"} <= \
        {n for n, _ in trainable}
    # not Deformable DETR's lr x0.1 group: the engine matches those names
    assert not any("sampling_offsets" in n or "reference_points" in n for n, _ in trainable)


def test_bf16_autocast_forward_backward():
    model = make(stages=1, levels=3, perturb=True).train()
    images, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask)
    assert out.boxes.dtype == torch.float32  # positions stay float32: bf16 pixels would be 8 px apart at 1333
    (out.logits.float().sum() + out.boxes.sum()).backward()
    assert torch.isfinite(model.query_boxes.weight.grad).all()


def test_build_detector_gives_the_official_mixer():
    cfg = ModelConfig(family="adamixer", backbone="resnet18", decoder_layers=1, num_queries=5, hidden_dim=32,
                      num_heads=4, ffn_dim=32)
    model = build_detector(cfg, C)
    assert isinstance(model, AdaMixer) and model.config is cfg and model.num_classes == C
    assert model.strides == [8, 16, 32, 64] and len(model.stages) == 1  # family default: 4 levels
    mixer = model.stages[0].sampling_mixing
    assert (mixer.groups, mixer.in_points, mixer.out_points) == (4, 32, 128)
    assert torch.equal(model.query_boxes.weight, torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(5, 1))
    bias = model.stages[0].sampling_mixing.offset_generator.bias.view(4, 32, 3)
    assert (bias[..., 2] == -1).all() and bias[..., :2].abs().max() <= 0.5
    light = build_detector(cfg.model_copy(update=dict(mixing_groups=2, mixing_in_points=16, mixing_out_points=8)), C)
    mixer = light.stages[0].sampling_mixing
    assert (mixer.groups, mixer.in_points, mixer.out_points) == (2, 16, 8)
    assert mixer.mixing_generator.out_features == 2 * (16 * 16 + 8 * 16)  # G (C_g^2 + P_out P_in)
    assert mixer.out_proj.in_features == 2 * 8 * 16
    with pytest.raises(ValidationError, match="divisible by its 3 mixing groups"):
        ModelConfig(family="adamixer", hidden_dim=32, num_heads=4, mixing_groups=3)
    with pytest.raises(ValidationError, match="no transformer encoder"):
        ModelConfig(family="adamixer", encoder_layers=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        AdaMixer(ModelConfig(family="adamixer", backbone="resnet18", hidden_dim=36, num_heads=4), C)


def test_engine_trains_one_epoch(tmp_path):
    data = DataConfig(root=tmp_path / "data", synthetic_train=8, synthetic_val=4, synthetic_image_size=96,
                      augment=AugmentConfig(scales=[96], max_size=128, crop=False, test_size=96))
    model = ModelConfig(family="adamixer", backbone="resnet18", decoder_layers=2, num_queries=10, hidden_dim=32,
                        num_heads=4, ffn_dim=64)
    config = TrialConfig(name="tiny-adamixer", data=data, model=model, runtime=RuntimeConfig(threads=1, data_workers=0),
                         schedule=ScheduleConfig(epochs=1, lr=1e-4, batch_size=4, warmup_iters=2))
    reports = []
    metrics = run_trial(config, tmp_path / "run", report=lambda m, c: reports.append(m), log=lambda s: None)
    assert [m["epoch"] for m in reports] == [1]
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["AP"] <= 1.0
    # what a Ray worker and a teacher load do: the config through JSON, the detector from its checkpoint
    assert TrialConfig.model_validate_json(config.model_dump_json()) == config
    teacher, _ = load_detector(tmp_path / "run" / "checkpoint.pt")
    assert isinstance(teacher, AdaMixer) and len(teacher.stages) == 2

