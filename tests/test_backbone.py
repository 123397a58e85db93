"""Backbone normalisation (frozen batch norm for pretrained weights as DETR, trainable from scratch) and DC5."""
import pytest
import torch
import torchvision

from trainers.config import ModelConfig
from trainers.models.backbone import Backbone, FrozenBatchNorm2d, dilate_last_stage


def test_norm_auto_follows_pretrained_weights(tmp_path):
    assert ModelConfig().norm == "batch_norm"
    assert ModelConfig(backbone_weights=tmp_path / "w.pth").norm == "frozen_bn"
    assert ModelConfig(backbone_norm="frozen_bn").norm == "frozen_bn"


def test_from_scratch_backbone_trains_every_stage_with_batch_statistics():
    net = Backbone("resnet18", 3, norm="batch_norm").train()
    assert all(p.requires_grad for p in net.parameters())
    bn = net.stages[0][0][1]  # the stem's batch norm
    before = bn.running_mean.clone()
    feats = net(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    assert [f.shape[1] for f, _ in feats] == [128, 256, 512]
    assert not torch.equal(before, bn.running_mean)  # batch statistics were used and tracked


def test_frozen_backbone_keeps_statistics_and_stem_fixed():
    net = Backbone("resnet18", 1, norm="frozen_bn").train()
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("stages.0.0.") for n in frozen)
    assert not any("bn" in n for n, _ in net.named_parameters())


def test_frozen_batch_norm_is_torchvisions_as_one_multiply_add():
    """Same buffers and state_dict as torchvision's; its scale and shift follow a loaded state_dict; the
    result equals the float64 formula; in bf16 it stays bf16 (torchvision's is promoted to float32)."""
    torch.manual_seed(0)
    reference = torchvision.ops.misc.FrozenBatchNorm2d(8)
    state = {"weight": torch.randn(8), "bias": torch.randn(8), "running_mean": torch.randn(8),
             "running_var": torch.rand(8) + 0.5, "num_batches_tracked": torch.tensor(7)}
    reference.load_state_dict(state)
    ours = FrozenBatchNorm2d(8)
    ours.load_state_dict(state)
    assert ours.state_dict().keys() == reference.state_dict().keys()  # scale and shift are not saved
    x = torch.randn(2, 8, 5, 7)
    s = {k: v.double().view(1, -1, 1, 1) for k, v in state.items() if k != "num_batches_tracked"}
    exact = (x.double() - s["running_mean"]) / (s["running_var"] + ours.eps).sqrt() * s["weight"] + s["bias"]
    assert (ours(x).double() - exact).abs().max() < 1e-5
    assert torch.allclose(ours(x), reference(x), atol=1e-6)
    assert ours(x.bfloat16()).dtype == torch.bfloat16 and reference(x.bfloat16()).dtype == torch.float32
    assert (ours(x.bfloat16()).double() - exact).abs().max() < 0.1

    def cast_affine(xb):  # what casting the float32 scale and shift at each bf16 forward would give
        return torch.addcmul(ours.shift.bfloat16().view(1, -1, 1, 1), xb, ours.scale.bfloat16().view(1, -1, 1, 1))
    assert torch.equal(ours(x.bfloat16()), cast_affine(x.bfloat16()))  # its kept bf16 scale and shift
    with torch.no_grad():  # buffers changed in place: refresh() is what makes the affine follow
        ours.running_var.fill_(4.0)
        ours.refresh()
    assert torch.allclose(ours(x), (x - ours.running_mean.view(1, -1, 1, 1)) / (4.0 + ours.eps) ** 0.5
                          * ours.weight.view(1, -1, 1, 1) + ours.bias.view(1, -1, 1, 1), atol=1e-5)
    assert torch.equal(ours(x.bfloat16()), cast_affine(x.bfloat16()))


def test_dc5_equals_torchvision_dilation_and_halves_the_stride():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]).eval()
    ours = torchvision.models.resnet50().eval()
    ours.load_state_dict(reference.state_dict())
    dilate_last_stage(ours.layer4)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = (torch.nn.Sequential(*list(net.children())[:-2])(x) for net in (reference, ours))
    assert a.shape == (1, 2048, 4, 6) and torch.equal(a, b)
    # BasicBlock (which torchvision refuses to dilate): C5 at stride 16
    (feature, mask), = Backbone("resnet18", 1, dilation=True)(torch.randn(2, 3, 96, 128),
                                                              torch.zeros(2, 96, 128, dtype=torch.bool))
    assert feature.shape == (2, 512, 6, 8) and mask.shape == (2, 6, 8)


def test_dc5_is_refused_where_strides_are_assumed():
    assert ModelConfig(family="conditional_detr", backbone="resnet18", backbone_dilation=True).backbone_dilation
    for family, backbone in (("deformable_detr", "resnet18"), ("adamixer", "resnet50"),
                             ("conditional_detr", "mobilenet_v2")):
        with pytest.raises(ValueError, match="backbone_dilation"):
            ModelConfig(family=family, backbone=backbone, backbone_dilation=True)


@pytest.mark.parametrize("name,c2_node", [("resnet18", "layer1"), ("resnet50", "layer1"),
                                          ("mobilenet_v2", "features.3")])
def test_c2_level_is_the_stride_4_map_of_the_same_network(name, c2_node):
    from torchvision.models.feature_extraction import create_feature_extractor
    x, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    torch.manual_seed(0)
    net = Backbone(name, 3, norm="batch_norm", with_c2=True).eval()
    torch.manual_seed(0)  # the same initial weights, in torchvision's own module
    reference = create_feature_extractor(getattr(torchvision.models, name)().eval(), {c2_node: "c2"})
    plain = Backbone(name, 3, norm="batch_norm").eval()
    plain.load_state_dict(net.state_dict())  # the same parameter names: C2 adds no module
    with torch.no_grad():
        feats, rest, c2 = net(x, mask), plain(x, mask), reference(x)["c2"]
    assert [tuple(f.shape[-2:]) for f, _ in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert net.channels == [c2.shape[1]] + plain.channels
    assert torch.equal(feats[0][0], c2) and feats[0][1].shape == (1, 16, 24)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(feats[1:], rest))


def test_c2_pyramid_is_adamixers_only():
    assert ModelConfig(family="adamixer", finest_stride=4).levels == 4
    for kw in (dict(family="deformable_detr"), dict(family="adamixer", num_feature_levels=3)):
        with pytest.raises(ValueError, match="finest_stride 4"):
            ModelConfig(finest_stride=4, **kw)
