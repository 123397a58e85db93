"""ScheduleConfig.amp_layer_norm "bfloat16": LayerNorm outputs stay bf16 under bf16 autocast (a bf16 residual
stream). The norm itself is float32 rounded once, a detector's predictions stay as close to float32 as plain
autocast's, fewer cast operators run, and the engine applies it to student and teacher only under amp."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from trainers.accel.bf16_weights import BF16Weights
from trainers.config import ScheduleConfig
from trainers.criterion import SetCriterion
from trainers.engine import DetectionLoss
from trainers.models import build_detector
from trainers.models.transformer_layers import LayerNorm, layer_norm, set_bf16_layer_norm
from test_bf16_weights import autocast
from test_gpu import FAMILIES, batch, small

CPU = torch.device("cpu")


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_output_is_the_float64_norm_of_bf16_input_and_weights_rounded_once(input_dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 7, 64, generator=g) * 3 + 1).to(input_dtype)
    weight, bias = torch.randn(64, generator=g), torch.randn(64, generator=g)
    with autocast():
        out = layer_norm(x, (64,), weight, bias, 1e-5, bf16_output=True)
    assert out.dtype == torch.bfloat16
    # the weights as autocast rounds a Linear's (CUDA's kernel takes no float32 weights with a bf16 input)
    w16, b16 = weight.to(torch.bfloat16).double(), bias.to(torch.bfloat16).double()
    x16 = x.to(torch.bfloat16).double()
    exact = F.layer_norm(x16, (64,), w16, b16, 1e-5)
    # a float32 computation rounded once: within one bf16 rounding (2^-8 relative) and float32 noise
    assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5).all()
    # against float32 weights, the two roundings of the affine's weights add at most their own 2^-8 each
    normalized = F.layer_norm(x16, (64,), None, None, 1e-5)
    full = normalized * weight.double() + bias.double()
    bound = (full.abs() + (normalized * weight.double()).abs() + bias.double().abs()) * 2 ** -8 + 1e-5
    assert ((out.double() - full).abs() <= bound).all()
    # not a bf16 computation: the rounding of the float32 norm with those weights, and only that
    plain = F.layer_norm(x16.float(), (64,), w16.float(), b16.float(), 1e-5)
    assert ((out.double() - plain.double()).abs() <= plain.double().abs() * 2 ** -8 + 1e-6).all()


def test_without_autocast_or_without_the_flag_it_is_nn_layer_norm():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 32, generator=g)
    ours, reference = LayerNorm(32), torch.nn.LayerNorm(32)
    with torch.no_grad():
        ours.weight.normal_(generator=g)
        ours.bias.normal_(generator=g)
    reference.load_state_dict(ours.state_dict())
    ours.bf16_output = True  # no autocast: no effect
    assert torch.equal(ours(x), reference(x))
    ours.bf16_output = False
    with autocast():
        assert torch.equal(ours(x), reference(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_norm_of_a_detector_is_switched(family):
    model = build_detector(small(family), 5)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, LayerNorm) and not m.bf16_output for m in norms)
    set_bf16_layer_norm(model, True)
    assert all(m.bf16_output for m in norms)


def _step(model, bf16_norms, amp=True):
    """One forward + backward (dropout 0) as the engine runs them (under amp on bf16 weight copies) ->
    last-layer logits, boxes, loss, cast operators dispatched."""
    set_bf16_layer_norm(model, bf16_norms)
    model.zero_grad(set_to_none=True)
    images, mask, targets = batch(CPU)
    forward = BF16Weights(model) if amp else model
    if amp:
        forward.refresh()  # the copies made (casts), as before a trial's first step
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy":
                casts.append(func)
            return func(*args, **(kwargs or {}))
    with Casts():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = forward(images, mask)
        loss = DetectionLoss(SetCriterion(5))(lambda *a, **k: out, images, mask, targets)["loss"]
        loss.backward()
    if amp:
        forward.grads_to_master()
    p = out.predictions
    return p.logits[-1].float().detach(), p.boxes[-1].float().detach(), loss.detach(), len(casts)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_detector_with_bf16_norms_is_as_close_to_float32_as_autocast_and_casts_less(family):
    torch.manual_seed(0)
    model = build_detector(small(family, hidden=64).model_copy(update={"dropout": 0.0}), 5).train()
    fp32 = _step(model, False, amp=False)
    plain = _step(model, False)
    ours = _step(model, True)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for i, name in enumerate(("logits", "boxes")):
        err_plain = (plain[i] - fp32[i]).abs().max().item()
        err_ours = (ours[i] - fp32[i]).abs().max().item()
        assert err_ours <= 3 * err_plain + 1e-3, (name, err_ours, err_plain)  # bf16, not off the rails
    assert not torch.equal(ours[0], plain[0])  # the option did change the computation
    assert abs(ours[2].item() - fp32[2].item()) <= 0.02 * fp32[2].item()
    assert ours[3] < plain[3], (ours[3], plain[3])  # fewer casts forward and backward


def test_the_engine_switches_student_and_teacher_only_under_amp(tiny_data_root, tmp_path_factory, monkeypatch):
    """On the CPU amp is off, so the option changes nothing; with amp forced on (the CPU's bf16 autocast) the
    student and the teacher get bf16 norms and the trial trains other weights than with float32 norms."""
    from conftest import tiny_distill_trial
    from trainers import engine
    config = tiny_distill_trial(tiny_data_root, tmp_path_factory)
    seen = []
    original = engine.set_bf16_layer_norm
    monkeypatch.setattr(engine, "set_bf16_layer_norm", lambda net, on: (seen.append(on), original(net, on)))

    def trained(amp_layer_norm, amp_on):
        monkeypatch.setattr(engine, "amp_enabled", lambda schedule, device: schedule.amp and amp_on)
        schedule = config.schedule.model_copy(update={"amp_layer_norm": amp_layer_norm})
        workdir = tmp_path_factory.mktemp(f"norms-{amp_layer_norm}-{amp_on}")
        engine.run_trial(config.model_copy(update={"schedule": schedule}), workdir, log=lambda s: None)
        return torch.load(workdir / "checkpoint.pt", weights_only=False)["model"]

    cpu_default = trained("bfloat16", amp_on=False)
    assert seen == [False, False]  # student, teacher
    seen.clear()
    bf16_norms, plain_amp = trained("bfloat16", amp_on=True), trained("float32", amp_on=True)
    assert seen == [True, True, False, False]
    assert not all(torch.equal(bf16_norms[k], plain_amp[k]) for k in plain_amp)
    assert all(torch.isfinite(v).all() for v in bf16_norms.values() if v.is_floating_point())
    assert cpu_default.keys() == bf16_norms.keys()
    assert ScheduleConfig().amp_layer_norm == "float32"  # autocast's policy unless asked
