"""Pretrained weights by name, offline: an empty cache is refused naming the file, a pre-seeded one is loaded."""
import typing
from pathlib import Path

import pytest
import torch
import torchvision

from trainers.config import BackboneName
from trainers.models.backbone import Backbone
from trainers.pretrained import IMAGENET_FILES, WeightsUnavailable, cache_path, hub_dir, imagenet_file


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DETRDISTILL_OFFLINE", "1")
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_the_cache_is_torch_hubs_and_the_files_torchvisions(empty_cache, monkeypatch):
    assert hub_dir() == Path(torch.hub.get_dir())
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", "/elsewhere")
    assert hub_dir() == Path(torch.hub.get_dir()) == Path("/elsewhere/torch/hub")
    for backbone, name in IMAGENET_FILES.items():
        url = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1.url
        assert url.rsplit("/", 1)[-1] == name == cache_path(backbone).name
    assert set(IMAGENET_FILES) == set(typing.get_args(BackboneName))


def test_offline_with_an_empty_cache_names_the_expected_file(empty_cache):
    with pytest.raises(WeightsUnavailable, match=str(empty_cache / "resnet18-f37072fd.pth")):
        imagenet_file("resnet18")
    with pytest.raises(WeightsUnavailable):
        Backbone("resnet18", 3, weights="imagenet")


def test_a_pre_seeded_cache_is_loaded(empty_cache):
    torch.manual_seed(0)
    seeded = torchvision.models.resnet18(weights=None, norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    with torch.no_grad():
        seeded.bn1.running_mean.uniform_()  # buffers too: a frozen batch norm is all buffers
    empty_cache.mkdir(parents=True)
    torch.save(seeded.state_dict(), empty_cache / "resnet18-f37072fd.pth")
    backbone = Backbone("resnet18", 3, weights="imagenet", norm="frozen_bn")
    loaded = backbone.stages[0][0].state_dict()  # the stem: conv1, bn1, relu, maxpool, layer1
    assert torch.equal(loaded["0.weight"], seeded.conv1.weight)
    assert torch.equal(loaded["1.running_mean"], seeded.bn1.running_mean)
    assert torch.equal(backbone.stages[2].state_dict()["0.conv1.weight"], seeded.layer4[0].conv1.weight)
