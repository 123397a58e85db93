"""Weights of transformers' ConditionalDetr load into ours and give the same predictions, every layer."""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trainers.criterion import SetCriterion  # noqa: E402
from trainers.models import from_transformers  # noqa: E402
from trainers.models.backbone import Backbone  # noqa: E402
from trainers.models.conditional_detr import ConditionalDETR  # noqa: E402
from trainers.models.hf_conditional_detr import model_config_from_hf  # noqa: E402
from trainers.models.output import DecoderPredictions  # noqa: E402
from trainers.models.hf_backbone import (backbone_name_from_hf, convert_hf_resnet,  # noqa: E402
                                                     hf_resnet_config)

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model: torch.nn.Module) -> None:
    """Replace transformers' init, whose zeros and identities (BN statistics, biases, LayerNorms) and tiny
    transformer weights (std 0.02) would let a wrong mapping pass, by values that make every tensor matter.
    The backbone's convolutions keep their (already random, kaiming) init."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.dim() <= 1:  # biases, LayerNorm / BN affine terms, running means
                t.add_(torch.randn_like(t) * 0.1)
            elif ".backbone." not in name:
                t.normal_(0, math.sqrt(1 / t[0].numel()))
        model.model.query_position_embeddings.weight.normal_()


def _hf_detector(backbone, enc, dec, queries, classes, d=64, heads=4, seed=0):
    torch.manual_seed(seed)
    config = transformers.ConditionalDetrConfig(
        backbone_config=hf_resnet_config(backbone), d_model=d, encoder_layers=enc, decoder_layers=dec,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d,
        num_queries=queries, num_labels=classes)
    model = transformers.ConditionalDetrForObjectDetection(config).eval()
    _perturb(model)
    return model


def _inputs(pad, h=96, w=128):  # stride 32: a 3 x 4 map
    torch.manual_seed(1)
    images = torch.randn(2, 3, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    if pad:
        mask[1, :, w - 40:] = True
        mask[1, h - 30:] = True
    return images, mask


def _hf_every_layer(hf, images, mask):
    """transformers' predictions of every decoder layer [L, B, N, .]: its decoder hidden states are the input,
    each layer's un-normed output and, last, the final normed output; its own norm and heads go on top."""
    out = hf.model(pixel_values=images, pixel_mask=(~mask).long(), output_hidden_states=True)
    states = out.decoder_hidden_states[1:]
    hidden = torch.stack([hf.model.decoder.layernorm(s) for s in states[:-1]] + [states[-1]])
    delta = hf.bbox_predictor(hidden)
    ref_points = out.reference_points.transpose(0, 1)  # [B, N, 2]
    reference = torch.log(ref_points.clamp(min=1e-5) / (1 - ref_points).clamp(min=1e-5))
    boxes = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1).sigmoid()
    return hf.class_labels_classifier(hidden), boxes, hidden


def _max_abs(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("backbone,enc,dec,queries,classes,pad", [
    ("resnet18", 1, 2, 10, 5, True),
    ("resnet18", 2, 1, 7, 1, False),
    ("resnet18", 0, 3, 12, 3, True),
    ("resnet50", 1, 2, 5, 20, True),
])
def test_parity(backbone, enc, dec, queries, classes, pad):
    hf = _hf_detector(backbone, enc, dec, queries, classes)
    ours = from_transformers(hf)
    assert isinstance(ours, ConditionalDETR) and not ours.training
    assert ours.config.backbone == backbone and ours.config.encoder_layers == enc
    images, mask = _inputs(pad)
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
        layers = _hf_every_layer(hf, images, mask)
        out = ours(images, mask if pad else None)
    assert _max_abs(out.logits[-1], ref.logits) < TOL
    assert _max_abs(out.boxes[-1], ref.pred_boxes) < TOL
    for name, a, b in zip(("logits", "boxes", "hidden"), (out.logits, out.boxes, out.hidden), layers):
        assert _max_abs(a, b) < TOL, name
    # the comparison means something: predictions differ between queries and between images
    assert ref.logits.std(1).mean() > 100 * TOL and _max_abs(ref.pred_boxes[0], ref.pred_boxes[1]) > 100 * TOL


def test_parity_through_save_pretrained(tmp_path):
    hf = _hf_detector("resnet18", 1, 2, 8, 4)
    hf.save_pretrained(tmp_path)
    ours = from_transformers(str(tmp_path))
    images, mask = _inputs(pad=True)
    with torch.no_grad():
        ref = hf(pixel_values=images, pixel_mask=(~mask).long())
        out = ours(images, mask)
    assert not ours.training
    assert _max_abs(out.logits[-1], ref.logits) < TOL and _max_abs(out.boxes[-1], ref.pred_boxes) < TOL


def _gradients_in_our_names(hf) -> dict:
    """transformers' gradients under our parameter names, renamed by the converter itself: it converts a
    copy of the model whose weights are the gradients (conversion renames and concatenates: linear).
    Parameters without a gradient get zeros."""
    twin = copy.deepcopy(hf)
    grads = {name: p.grad for name, p in hf.named_parameters()}
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(grads[name] if grads[name] is not None else torch.zeros_like(p))
    return from_transformers(twin).state_dict()


@pytest.mark.parametrize("perturb", [False, True])
def test_training_gradients_match(perturb):
    """Train mode (dropout 0): the set loss on each model's every-layer predictions, with one assignment,
    gives the same gradient in every parameter we train; so no detach, tie or frozen part differs and
    training follows transformers' model, not only inference. transformers' own init is tried too (its
    zero content queries, as training starts). The backbone's trained stages (layer2-4) are compared too."""
    torch.manual_seed(0)
    config = transformers.ConditionalDetrConfig(
        backbone_config=hf_resnet_config("resnet18"), d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        num_queries=10, num_labels=3, dropout=0.0)
    hf = transformers.ConditionalDetrForObjectDetection(config)
    if perturb:
        _perturb(hf)
    ours = from_transformers(hf)
    hf.train(), ours.train()
    # transformers 5 means to train layer2-4 like DETR, but its test `"stage.1" not in name` never matches
    # its own ResNet's "stages.1...", so it freezes the whole backbone; give every weight a gradient here
    for p in hf.parameters():
        p.requires_grad_(True)
    images, mask = _inputs(pad=True)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    criterion = SetCriterion(3)
    ref = DecoderPredictions(*_hf_every_layer(hf, images, mask))
    out = ours(images, mask).predictions
    indices = criterion.indices_for(ref, targets)
    criterion(ref, targets, indices)["loss"].backward()
    criterion(out, targets, indices)["loss"].backward()

    want = _gradients_in_our_names(hf)
    trained = {name: p.grad for name, p in ours.named_parameters() if p.requires_grad}
    scale = max(g.abs().max().item() for g in want.values() if g.is_floating_point())
    assert scale > 0 and len(trained) > 100
    for name, grad in trained.items():
        assert grad is not None, name
        assert _max_abs(grad, want[name]) <= 1e-5 * scale + 1e-3 * want[name].abs().max().item(), name
    frozen = {name for name, p in ours.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith("backbone.stages.0.0.") for name in frozen)  # DETR's: stem, layer1


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_features_match(name):
    """convert_hf_resnet alone: the three stages' features equal transformers' ResNetBackbone's."""
    torch.manual_seed(0)
    hf = transformers.ResNetBackbone(hf_resnet_config(name, ["stage2", "stage3", "stage4"])).eval()
    with torch.no_grad():
        for n, t in hf.state_dict().items():
            if n.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point() and t.dim() == 1:
                t.add_(torch.randn_like(t) * 0.1)
    ours = Backbone(name, 3).eval()
    ours.load_state_dict(convert_hf_resnet(hf))  # strict: every weight and BN buffer filled
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = hf(images).feature_maps
        out = ours(images, torch.zeros(1, 64, 96, dtype=torch.bool))
    for (f, _), r in zip(out, ref):
        assert f.shape == r.shape and _max_abs(f, r) < TOL * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_resnet_configs_round_trip(name):
    config = hf_resnet_config(name)
    assert backbone_name_from_hf(config) == name
    assert backbone_name_from_hf({"model_type": "timm_backbone", "backbone": name}) == name
    with torch.device("meta"):  # names and shapes only: no memory, no init
        hf_state = convert_hf_resnet(transformers.ResNetBackbone(config))
        ours = Backbone(name, 3).state_dict()
    assert {k: v.shape for k, v in hf_state.items()} == {k: v.shape for k, v in ours.items()}


def test_unsupported_inputs():
    with pytest.raises(ValueError, match="matches none"):
        backbone_name_from_hf(transformers.ResNetConfig(depths=[1, 1, 1, 1]))
    with pytest.raises(ValueError, match="stem/stride"):
        backbone_name_from_hf(transformers.ResNetConfig(downsample_in_bottleneck=True))
    with pytest.raises(ValueError, match="cannot convert"):
        from_transformers(torch.nn.Linear(2, 2))
    small = dict(backbone_config=hf_resnet_config("resnet18"), d_model=32, encoder_attention_heads=4,
                 decoder_attention_heads=4)
    assert model_config_from_hf(transformers.ConditionalDetrConfig(**small)).hidden_dim == 32
    for bad in [dict(position_embedding_type="learned"), dict(decoder_attention_heads=8),
                dict(decoder_ffn_dim=64), dict(backbone_config=hf_resnet_config("resnet18", ["stage3"]))]:
        with pytest.raises(ValueError, match="not supported|need stage4"):
            model_config_from_hf(transformers.ConditionalDetrConfig(**{**small, **bad}))


def test_auxiliary_loss_config_warns():
    """transformers' forward with auxiliary_loss=True is not the original's; the conversion says so."""
    hf = transformers.ConditionalDetrForObjectDetection(transformers.ConditionalDetrConfig(
        backbone_config=hf_resnet_config("resnet18"), d_model=32, encoder_layers=0, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, num_queries=3, num_labels=2, auxiliary_loss=True))
    with pytest.warns(UserWarning, match="auxiliary_loss"):
        from_transformers(hf)


def test_unsupported_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "detr"}')
    with pytest.raises(ValueError, match="not supported"):
        from_transformers(tmp_path)
    with pytest.raises(FileNotFoundError):
        from_transformers(tmp_path / "missing")
