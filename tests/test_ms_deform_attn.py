"""Multi-scale deformable attention against a direct per-point bilinear loop in float64."""
import math

import pytest
import torch

from trainers.models.ms_deform_attn import MSDeformAttn, ms_deform_attn_core

SHAPES = [(6, 5), (3, 4), (1, 2)]


def reference_core(value, spatial_shapes, locations, weights):
    """The definition, one sample at a time: pixel (x * W - 0.5, y * H - 0.5), four neighbours, zeros outside."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    starts = [0]
    for h, w in spatial_shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Q, M, D, dtype=torch.float64)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for l, (h, w) in enumerate(spatial_shapes):
                    for p in range(P):
                        x = locations[b, q, m, l, p, 0].item() * w - 0.5
                        y = locations[b, q, m, l, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(D, dtype=torch.float64)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                bilinear = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                sample += bilinear * value[b, starts[l] + yy * w + xx, m].double()
                        out[b, q, m] += weights[b, q, m, l, p].item() * sample
    return out.flatten(2)


def random_inputs(dtype, seed=0, B=2, Q=5, M=2, D=3, P=2):
    g = torch.Generator().manual_seed(seed)
    L, S = len(SHAPES), sum(h * w for h, w in SHAPES)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    # some locations outside [0, 1] exercise the zero padding
    locations = torch.rand(B, Q, M, L, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(B, Q, M, L, P, generator=g, dtype=dtype)
    return value, locations, weights


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_core_matches_bilinear_loop(dtype, tol):
    value, locations, weights = random_inputs(dtype)
    out = ms_deform_attn_core(value, SHAPES, locations, weights)
    expected = reference_core(value, SHAPES, locations, weights)
    assert out.shape == (2, 5, 2 * 3)
    assert (out.double() - expected).abs().max().item() < tol


def test_core_gradients():
    value, locations, weights = random_inputs(torch.float64, seed=1, B=1, Q=2, M=2, D=2, P=2)
    # random locations are (almost surely) off the pixel lines where bilinear sampling has kinks
    inputs = tuple(t.requires_grad_() for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, s, a: ms_deform_attn_core(v, SHAPES, s, a), inputs)


def test_module_shapes_init_and_padding():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    # official init: head h's points lie along direction 2*pi*h/M, point p at distance p+1
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    assert torch.allclose(bias[0, :, 1], torch.tensor([2.0, 0.0]))
    assert torch.allclose(bias[1, :, 0], torch.tensor([0.0, 1.0]), atol=1e-6)
    S = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, 7, 16), torch.randn(2, S, 16)
    refs = torch.rand(2, 7, 3, 2)
    mask = torch.zeros(2, S, dtype=torch.bool)
    out = attn(query, refs, value, SHAPES, mask)
    assert out.shape == (2, 7, 16)
    # padded positions must not contribute, whatever their values
    mask[1, :4] = True
    changed = value.clone()
    changed[1, :4] += 100.0
    assert torch.allclose(attn(query, refs, value, SHAPES, mask), attn(query, refs, changed, SHAPES, mask))
