"""ConditionalDETR: the detector contract's shapes, the extra query group, gradients."""
import math

import pytest
import torch

from trainers.config import ModelConfig
from trainers.models import DetectorOutput, QueryGroup, build_detector

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


def test_multi_level_memory_is_the_pyramid_under_global_attention():
    """num_feature_levels 4: strides 8/16/32/64 with their masks, one memory sequence over all of them, the
    extra query group still separate, gradients into every level's projection and the level embeddings."""
    model = _model(enc=1, dec=2, queries=5, num_feature_levels=4).train()
    torch.nn.init.normal_(model.box_head.layers[-1].weight, std=0.1)
    images, mask = _images(h=64, w=96)
    out = model(images, mask, queries=QueryGroup(position=torch.randn(3, D)))
    shapes = [(8, 12), (4, 6), (2, 3), (1, 2)]
    assert [f.shape for f in out.features] == [(2, D, h, w) for h, w in shapes]
    assert [m.shape for m in out.masks] == [(2, h, w) for h, w in shapes]
    assert out.masks[0][-1].any() and not out.masks[0][0].any()  # the padded image's finest mask has padding
    assert out.memory.shape == (2, sum(h * w for h, w in shapes), D)
    assert out.extra.logits.shape == (2, 2, 3, 3)
    sum(t.square().mean() for t in (out.logits, out.boxes, out.extra.boxes)).backward()
    for j in range(4):
        assert model.input_proj[j][0].weight.grad.abs().sum() > 0, j
    assert (model.level_embed.grad.abs().sum(1) > 0).all()
    with torch.no_grad():  # without an encoder the memory is the levels' maps, flattened in order
        plain = _model(enc=0, num_feature_levels=3).eval()(images, mask)
    torch.testing.assert_close(plain.memory, torch.cat([f.flatten(2).transpose(1, 2) for f in plain.features], 1))


def test_local_attention_init_is_a_kernel_around_the_reference_point():
    """attention_init 'local': head k's spatial term q_sine . k_pos equals gain^2 * sum over frequencies f in
    k..k+band-1 of cos(w_f (r_y - p_y)) + cos(w_f (r_x - p_x)) (float64, by hand), so it peaks at the
    reference point r; later layers start with the same kernel (query_scale = identity)."""
    from trainers.models.conditional_detr import LOCAL_GAIN
    from trainers.models.position_encoding import sine_box_encoding, sine_position_encoding
    d, heads, H, W = 64, 4, 6, 8
    torch.manual_seed(0)
    config = ModelConfig(family="conditional_detr", backbone="resnet18", encoder_layers=0, decoder_layers=2,
                         num_queries=4, hidden_dim=d, num_heads=heads, attention_init="local")
    model = build_detector(config, 3).double()
    reference = torch.tensor([[0.30, 0.62]], dtype=torch.float64)  # (x, y)
    grid_y, grid_x = torch.meshgrid(torch.arange(1, H + 1) / H, torch.arange(1, W + 1) / W, indexing="ij")
    positions = torch.stack([grid_x.flatten(), grid_y.flatten()], -1).double()  # the map encoding's (x, y), [S, 2]
    key_pos = sine_position_encoding(torch.zeros(1, H, W, dtype=torch.bool), d).double().flatten(2)[0].T  # [S, d]
    band = d // heads // 4
    for layer in model.decoder.layers:
        attn = layer.cross_attn
        with torch.no_grad():
            q = attn.q_pos_sine_proj(sine_box_encoding(reference, d // 2).double()).view(heads, -1)  # [h, d/h]
            k = attn.k_pos_proj(key_pos).view(-1, heads, d // heads)  # [S, h, d/h]
        spatial = torch.einsum("hc,shc->hs", q, k)  # [h, S]
        for head in range(heads):
            freq = 2 * math.pi / 10000.0 ** (2 * torch.arange(head, head + band, dtype=torch.float64) / (d // 2))
            delta = reference - positions  # [S, 2]
            expected = LOCAL_GAIN ** 2 * torch.cos(delta[:, :, None] * freq).sum((1, 2))
            torch.testing.assert_close(spatial[head], expected, rtol=1e-5, atol=1e-4)  # encodings in float32
        nearest = (positions - reference).abs().sum(1).argmin()
        assert spatial[0].argmax() == nearest
    scale = model.decoder.query_scale(torch.randn(5, d, dtype=torch.float64))
    torch.testing.assert_close(scale, torch.ones_like(scale))


def test_local_attention_init_starts_the_encoder_as_the_identity():
    """Its residual branches start at zero: memory = LayerNorm(LayerNorm(features)) per position, whatever
    the other positions hold."""
    model = _model(enc=2, num_feature_levels=2, attention_init="local").eval()
    images, mask = _images()
    with torch.no_grad():
        out = model(images, mask)
    flat = torch.cat([f.flatten(2).transpose(1, 2) for f in out.features], 1)
    expected = flat
    for _ in range(2 * 2):  # two layer norms a layer, weights 1 and biases 0 at init
        expected = torch.nn.functional.layer_norm(expected, (D,))
    torch.testing.assert_close(out.memory, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fields,message", [
    (dict(num_feature_levels=2, backbone_dilation=True), "DC5"),
    (dict(num_feature_levels=2, hidden_dim=48, num_heads=4), "divisible by 32"),
    (dict(family="deformable_detr", attention_init="local"), "for conditional_detr"),
    (dict(hidden_dim=24, num_heads=4, attention_init="local"), "head width"),
])
def test_config_refuses_what_conditional_detr_cannot_build(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"family": "conditional_detr", **fields})


def test_attention_bias_is_the_bool_masks_attention_in_an_aligned_layout():
    """attention_bias: -inf where blocked, 0 elsewhere, its rows starting at multiples of 8 elements (what the
    memory-efficient CUDA kernel takes without copying); multi-head attention with it equals PyTorch's
    attention with the bool mask, padded keys and blocked query pairs alike."""
    import torch.nn.functional as F
    from trainers.models.transformer_layers import attention_bias, multi_head_attention
    g = torch.Generator().manual_seed(0)
    B, N, S, h, dq = 2, 5, 13, 2, 4
    padded = torch.zeros(B, S, dtype=torch.bool)
    padded[1, 9:] = True
    bias = attention_bias(padded[:, None, None, :], torch.float32)
    assert bias.shape == (B, 1, 1, S) and all(stride % 8 == 0 for stride in bias.stride()[:-1])
    assert torch.equal(bias, torch.where(padded, float("-inf"), 0.0)[:, None, None, :])
    q, k, v = (torch.randn(B, n, h * dq, generator=g) for n in (N, S, S))

    def reference(mask):  # True = attend, as PyTorch's bool attn_mask
        heads = [x.view(B, x.shape[1], h, dq).transpose(1, 2) for x in (q, k, v)]
        return F.scaled_dot_product_attention(*heads, attn_mask=mask).transpose(1, 2).flatten(2)
    assert torch.allclose(multi_head_attention(q, k, v, h, bias), reference(~padded[:, None, None, :]), atol=1e-6)
    blocked = torch.rand(N, S, generator=g) > 0.6
    blocked[:, 0] = False  # every query attends somewhere
    assert torch.allclose(multi_head_attention(q, k, v, h, attention_bias(blocked, torch.float32)),
                          reference(~blocked), atol=1e-6)
    assert attention_bias(blocked, torch.bfloat16).dtype == torch.bfloat16


def test_padding_reaches_attention_as_one_bias_per_forward():
    """The padding mask becomes an attention bias once per forward, whatever the depth: no attention call
    converts a bool mask (logical_not / where) or builds one of its own (~mask)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaskOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("logical_not", "bitwise_not", "where", "scalar_tensor", "masked_fill",
                                                "masked_fill_", "constant_pad_nd"):
                self.count += 1
            return func(*args, **(kwargs or {}))
    images, mask = _images()
    counts = []
    for enc, dec in ((1, 1), (3, 4)):
        model = _model(enc, dec).eval()
        with torch.no_grad(), MaskOps() as ops:
            model(images, mask)
        counts.append(ops.count)
    assert counts[0] == counts[1], counts
