"""Shared fixtures: a tiny synthetic COCO-format dataset and tiny trial configs (CPU, seconds)."""
import pytest

from detrdistill.trainers.config import AugmentConfig, DataConfig, ModelConfig, ScheduleConfig, TrialConfig
from detrdistill.trainers.data.synthetic import make_synthetic

TINY_SIZE = 96


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    """16 train / 8 val synthetic images at 96 px, generated once per test session."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, train=16, val=8, seed=0, image_size=TINY_SIZE)
    return root


def tiny_trial(root, family="conditional_detr", epochs=2, **overrides) -> TrialConfig:
    """A trial small enough for a unit test: resnet18, d=64, 1+1 layers, 10 queries, 96 px, batch 4."""
    data = DataConfig(format="coco", root=root, train="annotations/instances_train.json",
                      val="annotations/instances_val.json", num_workers=0,
                      augment=AugmentConfig(scales=[80, 96], max_size=112, crop=True, crop_resize=[64, 80],
                                            crop_min=48, crop_max=80, test_size=TINY_SIZE))
    model = dict(family=family, backbone="resnet18", decoder_layers=1, num_queries=10, hidden_dim=64,
                 num_heads=4, ffn_dim=128)
    if family != "adamixer":
        model["encoder_layers"] = 1
    if family == "deformable_detr":
        model["num_feature_levels"] = 2
    cfg = dict(name=f"tiny-{family}", data=data, model=ModelConfig(**model),
               schedule=ScheduleConfig(epochs=epochs, lr=2e-4, batch_size=4, lr_drop_epochs=[1], warmup_iters=2),
               cpus=1)
    cfg.update(overrides)
    return TrialConfig(**cfg)
