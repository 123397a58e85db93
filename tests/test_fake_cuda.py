"""CUDA's dtype rules without a GPU: each family's bf16 forward, as the engine runs it, on fake CUDA tensors
under CUDA's autocast policy (benchmarks/cuda_casts.py). The CPU's own autocast differs (LayerNorm stays in its
input's dtype; its LayerNorm mixes a bf16 input with float32 weights, CUDA's refuses), so a bf16 path that only
the CPU ran could still fail on the first GPU it meets; these forwards fail here instead."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_gpu import FAMILIES, small

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cuda_casts import as_the_engine_runs, count_forward, cuda_autocast, fake_cuda  # noqa: E402

# bf16 / bf16-ln: as the engine runs amp (bf16 weight copies; float32 / bf16 norms); -plain: autocast alone, as
# a compiled model runs before the compiler fuses it
DTYPES = ["bf16", "bf16-ln", "bf16-plain", "bf16-ln-plain"]


def test_the_fake_device_applies_cudas_rules_not_the_cpus():
    x = torch.randn(4, 8).to(torch.bfloat16)
    weight, bias = torch.ones(8), torch.zeros(8)
    assert F.layer_norm(x, (8,), weight, bias).dtype == torch.bfloat16  # the CPU mixes the dtypes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16  # the CPU's policy: the input's dtype
    with fake_cuda():
        x, weight, bias = torch.randn(4, 8).to(torch.bfloat16), torch.ones(8), torch.zeros(8)
        assert x.device.type == "cuda"
        with pytest.raises(RuntimeError, match="expected scalar type BFloat16 but found Float"):
            F.layer_norm(x, (8,), weight, bias)
        with cuda_autocast():
            assert F.layer_norm(x, (8,)).dtype == torch.float32  # CUDA's policy: float32
            assert F.linear(x.float(), weight[None]).dtype == torch.bfloat16
            with torch.autocast("cuda", enabled=False):  # as our code turns it off locally
                assert F.linear(x.float(), weight[None]).dtype == torch.float32
            assert F.linear(x.float(), weight[None]).dtype == torch.bfloat16  # and on again after
        assert not torch.is_autocast_enabled("cuda")


def _student_and_teacher_forward(family, dtype, decoder_layers=2, encoder_layers=2, teacher_count=None):
    """On fake CUDA: a frozen teacher's forward, then the student's with the teacher's queries as an extra
    group, both as the engine runs them in `dtype` (fp32: amp off) -> (student output, operator count of the
    student's). teacher_count: a list that receives the teacher forward's count."""
    from trainers.models import build_detector
    update = {"decoder_layers": decoder_layers} | ({} if family == "adamixer" else {"encoder_layers": encoder_layers})
    config = small(family).model_copy(update=update)
    amp = dtype != "fp32"
    teacher = as_the_engine_runs(build_detector(config, 5).eval(), dtype, frozen=True)
    forward = as_the_engine_runs(build_detector(config, 5).train(), dtype)
    images, mask = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    out = {}
    with torch.no_grad():
        counted = count_forward(lambda: out.setdefault("t", teacher(images, mask)), amp=amp)
    if teacher_count is not None:
        teacher_count.append(counted)
    queries = out["t"].queries.detach()
    count = count_forward(lambda: out.setdefault("s", forward(images, mask, queries=queries)), amp=amp)
    return out["s"], count


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_forward_with_a_teacher_group_runs_under_cudas_rules(family, dtype):
    with fake_cuda():
        out, count = _student_and_teacher_forward(family, dtype)
        p, extra = out.predictions, out.extra
        assert p.logits.device.type == "cuda" and p.logits.shape[:2] == (2, 2) and extra.logits.shape[:2] == (2, 2)
        assert p.logits.dtype in (torch.float32, torch.bfloat16)
        if "-ln" in dtype and family != "adamixer":  # the residual stream, i.e. every layer's output
            assert p.hidden.dtype == torch.bfloat16
    assert count.ops["_to_copy"] > 0  # autocast did cast: the policy was on


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_norms_cast_less_on_cuda(family):
    with fake_cuda():
        _, plain = _student_and_teacher_forward(family, "bf16")
        _, norms = _student_and_teacher_forward(family, "bf16-ln")
    assert norms.ops["_to_copy"] < plain.ops["_to_copy"]
    assert sum(norms.ops.values()) < sum(plain.ops.values())


def test_conditional_detr_with_bf16_norms_casts_no_more_for_more_layers():
    """Conditional DETR's bf16 residual stream casts only at its edges (the image, the masks, the query
    embedding, the reference points), not in its layers: the cast count does not grow with depth, which a
    float32 positional term or norm output inside a layer would make it do."""
    with fake_cuda():
        counts = [_student_and_teacher_forward("conditional_detr", "bf16-ln", n, n)[1].ops["_to_copy"]
                  for n in (2, 4)]
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-ln"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forwards_never_make_the_host_wait_for_the_gpu(family, dtype):
    """No copy from host memory that blocks (a pageable one may wait for the queued kernels: AdaMixer's
    `new_tensor` of its coordinate scales did, 6 a forward), none to the host, no .item(), in the teacher's
    forward or the student's: on a GPU the host keeps queueing ahead of the kernels."""
    with fake_cuda():
        teacher = []
        _, student = _student_and_teacher_forward(family, dtype, teacher_count=teacher)
    assert sum(student.ops.values()) > 100 and student.syncs == [] and teacher[0].syncs == []
