"""Our DeformableDETR with converted weights gives transformers' DeformableDetrForObjectDetection outputs."""
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trainers.models.hf_backbone import hf_resnet_config  # noqa: E402
from trainers.models.hf_deformable_detr import convert_deformable_detr  # noqa: E402

TOL = 1e-4
STAGES = ["stage2", "stage3", "stage4"]


def hf_config(backbone="resnet18", d=64, enc=1, dec=2, heads=4, levels=4, queries=10, labels=5, points=2,
              **overrides):
    out_features = STAGES[3 - min(levels, 3):]
    kwargs = dict(backbone_config=hf_resnet_config(backbone, out_features), d_model=d, encoder_layers=enc,
                  decoder_layers=dec, encoder_attention_heads=heads, decoder_attention_heads=heads,
                  encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d, encoder_n_points=points, decoder_n_points=points,
                  num_feature_levels=levels, num_queries=queries, num_labels=labels)
    kwargs.update(overrides)
    return transformers.DeformableDetrConfig(**kwargs)


def hf_model(seed=0, **kwargs):
    """A random transformers model whose zero/identity-initialised weights and BN statistics are perturbed,
    so that every weight matters to the outputs."""
    torch.manual_seed(seed)
    model = transformers.DeformableDetrForObjectDetection(hf_config(**kwargs)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif b.is_floating_point():
                b.add_(0.05 * torch.randn(b.shape, generator=g))
    return model


def inputs(B, H, W, padded):
    g = torch.Generator().manual_seed(7)
    images = torch.randn(B, 3, H, W, generator=g)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    if padded:  # last image is smaller than the batch canvas, padded bottom and right
        mask[-1, H - 24:, :] = True
        mask[-1, :, W - 40:] = True
        images[-1][:, mask[-1]] = 0.0
    return images, mask


def max_differences(hf, ours, images, mask):
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
        out = ours(images, mask)
    return {
        "logits": (out.logits[-1] - ref.logits).abs().max().item(),
        "boxes": (out.boxes[-1] - ref.pred_boxes).abs().max().item(),
        "hidden": (out.hidden.transpose(0, 1) - ref.intermediate_hidden_states).abs().max().item(),
        "memory": (out.memory - ref.encoder_last_hidden_state).abs().max().item(),
    }


CASES = [  # backbone, d, enc, dec, heads, levels, queries, labels, (B, H, W), padded
    ("resnet18", 64, 1, 2, 4, 4, 10, 5, (1, 96, 128), False),
    ("resnet18", 64, 2, 3, 8, 4, 7, 3, (2, 96, 128), True),
    ("resnet18", 96, 0, 2, 3, 1, 5, 2, (2, 64, 96), True),
    ("resnet18", 64, 1, 2, 2, 2, 12, 4, (2, 96, 96), True),
    ("resnet18", 128, 1, 2, 8, 3, 9, 7, (2, 64, 128), True),
    ("resnet18", 64, 1, 2, 4, 5, 6, 3, (2, 128, 96), True),
    ("resnet50", 64, 1, 2, 4, 4, 8, 6, (2, 96, 128), True),
]


@pytest.mark.parametrize("backbone,d,enc,dec,heads,levels,queries,labels,shape,padded", CASES)
def test_converted_model_matches_transformers(backbone, d, enc, dec, heads, levels, queries, labels, shape, padded):
    hf = hf_model(backbone=backbone, d=d, enc=enc, dec=dec, heads=heads, levels=levels, queries=queries,
                  labels=labels)
    ours = convert_deformable_detr(hf)
    assert not ours.training
    diffs = max_differences(hf, ours, *inputs(*shape, padded))
    print(f"\n{backbone} d={d} enc={enc} dec={dec} levels={levels} padded={padded}: max abs diff", diffs)
    assert max(diffs.values()) < TOL, diffs


def test_through_save_pretrained(tmp_path):
    from_transformers = pytest.importorskip("trainers.models.hf_import").from_transformers
    hf = hf_model(seed=3, levels=4, enc=1, dec=2)
    hf.save_pretrained(tmp_path)
    ours = from_transformers(tmp_path)
    diffs = max_differences(hf, ours, *inputs(2, 96, 128, padded=True))
    print("\nthrough save_pretrained: max abs diff", diffs)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("overrides,message", [
    (dict(with_box_refine=True), "box refinement"),
    (dict(with_box_refine=True, two_stage=True), "two_stage"),
    (dict(decoder_ffn_dim=32), "decoder_ffn_dim"),
    (dict(decoder_n_points=3), "decoder_n_points"),
    (dict(num_feature_levels=2, backbone_config=hf_resnet_config("resnet18", STAGES)), "backbone outputs"),
])
def test_refuses_what_we_do_not_implement(overrides, message):
    fake = types.SimpleNamespace(config=hf_config(**overrides))  # the config is checked before any weight
    with pytest.raises(ValueError, match=message):
        convert_deformable_detr(fake)
