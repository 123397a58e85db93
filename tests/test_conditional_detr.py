"""ConditionalDETR: the detector contract's shapes, the extra query group, gradients."""
import pytest
import torch

from detrdistill.trainers.config import ModelConfig
from detrdistill.trainers.models import DetectorOutput, QueryGroup, build_detector

D = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(enc=1, dec=2, queries=6, classes=3, backbone="resnet18", **kw):
    torch.manual_seed(0)
    config = ModelConfig(family="conditional_detr", backbone=backbone, backbone_norm="frozen_bn", encoder_layers=enc, decoder_layers=dec,
                         num_queries=queries, hidden_dim=D, num_heads=4, ffn_dim=64, **kw)
    return build_detector(config, classes)


def _images(batch=2, h=64, w=96, pad=True):
    torch.manual_seed(1)
    images = torch.randn(batch, 3, h, w)
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    if pad:
        mask[-1, :, w - 32:] = True  # last image is narrower and shorter
        mask[-1, h - 32:] = True
    return images, mask if pad else None


@pytest.mark.parametrize("enc,dec,queries,classes,pad", [(0, 1, 5, 3, False), (2, 3, 7, 1, True), (1, 2, 4, 80, True)])
def test_output_shapes(enc, dec, queries, classes, pad):
    model = _model(enc, dec, queries, classes).eval()
    images, mask = _images(pad=pad)
    with torch.no_grad():
        out = model(images, mask)
    assert isinstance(out, DetectorOutput)
    B, H, W = 2, 2, 3  # stride 32
    assert out.logits.shape == (dec, B, queries, classes)
    assert out.boxes.shape == (dec, B, queries, 4)
    assert out.hidden.shape == (dec, B, queries, D)
    assert [f.shape for f in out.features] == [(B, D, H, W)]
    assert [m.shape for m in out.masks] == [(B, H, W)] and out.masks[0].dtype == torch.bool
    assert out.masks[0][-1].any() == pad and not out.masks[0][0].any()
    assert out.memory.shape == (B, H * W, D)
    assert out.queries.position.shape == (queries, D) and out.queries.num_queries == queries
    assert out.extra is None
    assert ((out.boxes >= 0) & (out.boxes <= 1)).all() and torch.isfinite(out.logits).all()
    # focal prior: every class starts near probability 0.01
    assert torch.allclose(out.logits.sigmoid().mean(), torch.tensor(0.01), atol=0.01)
    if enc == 0:  # no encoder: the memory is the projected feature map itself
        assert torch.equal(out.memory, out.features[0].flatten(2).transpose(1, 2))


def test_extra_query_group_is_separate():
    model = _model(enc=1, dec=3, queries=6).eval()
    images, mask = _images()
    group = QueryGroup(position=torch.randn(9, D))
    with torch.no_grad():
        plain = model(images, mask)
        both = model(images, mask, queries=group)
    assert both.extra.logits.shape == (3, 2, 9, 3)
    assert both.extra.boxes.shape == (3, 2, 9, 4)
    assert both.extra.hidden.shape == (3, 2, 9, D)
    for a, b in [(plain.logits, both.logits), (plain.boxes, both.boxes), (plain.hidden, both.hidden)]:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # no attention between the groups: the model's own queries as the extra group reproduce its predictions
    with torch.no_grad():
        same = model(images, mask, queries=plain.queries.detach())
    torch.testing.assert_close(same.extra.boxes, plain.boxes, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="position"):
        model(images, mask, queries=QueryGroup(content=torch.randn(4, D)))


def test_gradients_reach_every_trainable_parameter():
    model = _model(enc=1, dec=2, dropout=0.1).train()
    torch.nn.init.normal_(model.box_head.layers[-1].weight, std=0.1)  # zero at init, which would stop gradients
    images, mask = _images()
    out = model(images, mask, queries=QueryGroup(position=torch.randn(3, D)))
    loss = sum(t.square().mean() for t in (out.logits, out.boxes, out.extra.logits, out.extra.boxes))
    loss.backward()
    # the first layer's content is all zeros, so its self-attention content/value weights see no signal
    zero_input = {f"decoder.layers.0.self_attn.{p}.weight" for p in ("q_content_proj", "k_content_proj", "v_proj")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad.abs().sum() > 0) != (name in zero_input), name
    # frozen batch norm: statistics and affine terms are buffers; the stem and layer1 are never trained
    assert not any("bn" in n or "downsample.1" in n for n, _ in model.backbone.named_parameters())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("backbone.stages.0.0.") for n in frozen)


def test_frozen_backbone_when_not_trained():
    model = _model(train_backbone=False)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))
