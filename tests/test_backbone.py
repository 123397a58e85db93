"""Backbone normalisation: frozen batch norm for pretrained weights (DETR), trainable from scratch."""
import torch

from detrdistill.trainers.config import ModelConfig
from detrdistill.trainers.models.backbone import Backbone


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
