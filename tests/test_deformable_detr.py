"""Deformable DETR behind the detector contract: shapes, the extra query group, gradients, lr groups."""
import copy

import pytest
import torch

from trainers.config import ModelConfig
from trainers.models import QueryGroup, build_detector
from trainers.models.deformable_detr import DeformableDETR

C, D = 3, 32


def make(encoder_layers=1, decoder_layers=2, levels=4, queries=6, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(family="deformable_detr", backbone="resnet18", backbone_norm="frozen_bn",
                      encoder_layers=encoder_layers,
                      decoder_layers=decoder_layers, num_queries=queries, hidden_dim=D, num_heads=2, ffn_dim=48,
                      num_feature_levels=levels, num_points=2, dropout=dropout)
    return build_detector(cfg, C)


def batch(B=2, H=64, W=96):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, 40:, :] = True  # second image is 40 x 64 inside a 64 x 96 batch
    mask[1, :, 64:] = True
    return images, mask


@pytest.mark.parametrize("enc,dec,levels", [(0, 1, 1), (2, 3, 4), (0, 3, 2), (2, 1, 3)])
def test_shapes(enc, dec, levels):
    model = make(enc, dec, levels).eval()
    assert isinstance(model, DeformableDETR)
    images, mask = batch()
    with torch.no_grad():
        out = model(images, mask)
    B, N = 2, 6
    assert out.logits.shape == (dec, B, N, C)
    assert out.boxes.shape == (dec, B, N, 4)
    assert out.hidden.shape == (dec, B, N, D)
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2)]  # strides 8, 16, 32 and one 3x3 stride-2 conv on 2 x 3
    sizes = sizes[3 - levels:3] if levels < 4 else sizes
    assert [tuple(f.shape) for f in out.features] == [(B, D, h, w) for h, w in sizes]
    assert [tuple(m.shape) for m in out.masks] == [(B, h, w) for h, w in sizes]
    assert not any(m[0].any() for m in out.masks) and out.masks[0][1].any()
    S = sum(f.shape[-2] * f.shape[-1] for f in out.features)
    assert out.memory.shape == (B, S, D)
    assert out.queries.position.shape == (N, D) and out.queries.content.shape == (N, D)
    assert out.extra is None
    # the no-mask call treats everything as image
    with torch.no_grad():
        assert torch.equal(model(images).logits, model(images, torch.zeros_like(mask)).logits)


def test_extra_group_is_separate():
    model = make(encoder_layers=1, decoder_layers=2, levels=2).eval()
    images, mask = batch()
    g = torch.Generator().manual_seed(5)
    extra = QueryGroup(position=torch.randn(4, D, generator=g), content=torch.randn(4, D, generator=g))
    with torch.no_grad():
        plain = model(images, mask)
        both = model(images, mask, queries=extra)
        # the same queries as some model's own, decoded alone
        alone = copy.deepcopy(model)
        alone.query_embed = torch.nn.Embedding.from_pretrained(torch.cat([extra.position, extra.content], 1))
        ref = alone(images, mask)
    for a, b in ((plain.predictions, both.predictions), (ref.predictions, both.extra)):
        for name in ("logits", "boxes", "hidden"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5)
    assert both.extra.logits.shape == (2, 2, 4, C)
    torch.testing.assert_close(both.aux["extra_reference_points"], ref.aux["reference_points"])
    with pytest.raises(ValueError, match="position and content"):
        model(images, mask, queries=QueryGroup(position=extra.position))


def test_gradients_reach_all_trainable_parameters():
    model = make(encoder_layers=1, decoder_layers=2, levels=4).train()
    # Zero-initialised weights block some gradients at init (the last box layer those of the box MLP; the
    # offset and weight layers those of an attention's query, hence of the level embedding): perturb them.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.01)
    images, mask = batch()
    teacher = QueryGroup(position=torch.randn(3, D), content=torch.randn(3, D))
    out = model(images, mask, queries=teacher)
    loss = sum(t.sum() for t in (out.logits, out.boxes, out.extra.logits, out.extra.boxes))
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 100
    missing = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_linear_proj_names_and_init():
    model = make(encoder_layers=2, decoder_layers=2, levels=3)
    names = model.linear_proj_parameter_names()
    # 2 params each in 2 encoder + 2 decoder attentions, plus the reference-point layer
    assert len(names) == 2 * 4 + 2
    assert {"reference_points.weight", "reference_points.bias"} <= set(names)
    assert all("sampling_offsets" in n or n.startswith("reference_points.") for n in names)
    assert torch.allclose(model.class_head.bias, torch.full((C,), -4.59512), atol=1e-4)
    # the stem and first stage stay frozen, as in DETR
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone.stages.0.0."))


def test_level_embed_only_with_encoder():
    assert make(encoder_layers=0).level_embed is None
    assert make(encoder_layers=1, levels=3).level_embed.shape == (3, D)
