"""BF16Weights: a bf16 autocast step on bf16 copies of the Linear/Conv2d weights equals plain autocast's bit for
bit (loss and every gradient, student and distillation steps), with fewer operators; the copies follow the
float32 weights step after step and never enter a state_dict."""
import sys
from pathlib import Path

import pytest
import torch

from trainers.accel.bf16_weights import BF16Weights
from trainers.config import DistillConfig
from trainers.criterion import SetCriterion
from trainers.distill.objective import DistillationLoss
from trainers.engine import DetectionLoss
from trainers.models import build_detector
from trainers.models.transformer_layers import LayerNorm, set_bf16_layer_norm
from test_gpu import FAMILIES, batch, small

CPU = torch.device("cpu")


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def train_step(loss_fn, model, params, wrapper=None, seed=0):
    """One bf16 forward + backward (dropout 0.1: the seed makes both runs draw the same masks)."""
    images, mask, targets = batch(CPU)
    for p in params:
        p.grad = None
    torch.manual_seed(seed)
    with autocast():
        losses = loss_fn(wrapper or model, images, mask, targets)
    losses["loss"].backward()
    if wrapper is not None:
        wrapper.grads_to_master()
    return {k: v.detach().clone() for k, v in losses.items() if torch.is_tensor(v)}, grads(params)


def assert_bitwise(a, b):
    (losses_a, grads_a), (losses_b, grads_b) = a, b
    assert losses_a.keys() == losses_b.keys()
    for k in losses_a:
        assert torch.equal(losses_a[k], losses_b[k]), k
    assert [g is None for g in grads_a] == [g is None for g in grads_b]
    assert sum(g is not None for g in grads_a) > 0
    for i, (x, y) in enumerate(zip(grads_a, grads_b)):
        assert x is None or (x.dtype == y.dtype == torch.float32 and torch.equal(x, y)), f"parameter {i}"


@pytest.mark.parametrize("bf16_norms", [False, True], ids=["norms-fp32", "norms-bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_student_step_equals_plain_autocast_bitwise(family, bf16_norms):
    """bf16_norms (schedule.amp_layer_norm bfloat16): the LayerNorms take bf16 copies of their weights too,
    which plain autocast casts at every call (transformer_layers.layer_norm)."""
    torch.manual_seed(0)
    model = build_detector(small(family).model_copy(update={"dropout": 0.1}), 5).train()
    set_bf16_layer_norm(model, bf16_norms)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = DetectionLoss(SetCriterion(5))
    wrapper = BF16Weights(model)
    assert len(wrapper.master) > 20 and all(p.dtype == torch.float32 for p in model.parameters())
    for step in range(2):  # the second step: copies refreshed in place, gradient buffers reused
        plain = train_step(loss_fn, model, params, seed=step)
        copied = train_step(loss_fn, model, params, wrapper, seed=step)
        assert_bitwise(plain, copied)
        with torch.no_grad():  # an optimizer step's worth of change: the copies must follow it
            for p in params:
                p.add_(torch.randn_like(p) * 1e-2)
    assert all(c.dtype == torch.bfloat16 for c in wrapper.copies)
    norm_weights = {id(p) for m in model.modules() if isinstance(m, LayerNorm) for p in m.parameters()}
    assert norm_weights and (len(wrapper.norm_slots) == len(norm_weights))  # each norm's weight and bias
    in_projections = [m.in_proj_weight for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert (family == "deformable_detr") == bool(in_projections)  # its decoder's self-attention
    assert all(any(p is q for q in wrapper.master) for p in in_projections)
    assert set(wrapper.state_dict()) == {f"model.{k}" for k in model.state_dict()}  # the copies are not registered
    assert set(model.state_dict()) == set(build_detector(small(family), 5).state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_step_with_bf16_teacher_equals_plain_autocast_bitwise(family):
    torch.manual_seed(0)
    student = build_detector(small(family), 5).train()
    teacher = build_detector(small(family, backbone="resnet34"), 5)
    loss_fn = DistillationLoss(teacher, SetCriterion(5), DistillConfig(method="detrdistill"), 64, 64, 2, 2,
                               student.config.levels)
    params = [p for p in student.parameters() if p.requires_grad] + list(loss_fn.trainable.parameters())
    plain = train_step(loss_fn, student, params)
    teacher_before = [p.clone() for p in teacher.parameters()]
    loss_fn.teacher = BF16Weights(teacher, frozen=True)
    copied = train_step(loss_fn, student, params, BF16Weights(student))
    assert_bitwise(plain, copied)
    assert {"kd_logits", "kd_feature", "kd_query_prior"} <= copied[0].keys()
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(teacher_before, teacher.parameters()))
    assert all(not c.requires_grad for c in loss_fn.teacher.copies)


def test_gradients_add_to_existing_ones_and_fewer_operators():
    """A parameter that already has a gradient gets the copy's added (as autograd accumulates); and the
    step dispatches fewer operators than plain autocast (the per-tensor casts are gone)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from step import count_ops  # what benchmarks/step.py reports as "ops"
    torch.manual_seed(0)
    model = build_detector(small("conditional_detr"), 5).train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn, wrapper = DetectionLoss(SetCriterion(5)), BF16Weights(model)
    _, once = train_step(loss_fn, model, params, wrapper)
    images, mask, targets = batch(CPU)
    torch.manual_seed(0)  # as train_step, for the same dropout masks
    with autocast():
        loss = loss_fn(wrapper, images, mask, targets)["loss"]
    loss.backward()  # gradients not cleared: they accumulate
    wrapper.grads_to_master()
    assert all(p.grad is None or torch.equal(p.grad, 2 * g) for p, g in zip(params, once))

    def step(forward_model):
        def run():
            for p in params:
                p.grad = None
            with autocast():
                loss = loss_fn(forward_model, images, mask, targets)["loss"]
            loss.backward()
            if forward_model is wrapper:
                wrapper.grads_to_master()
        return run
    plain_ops, copied_ops = count_ops(step(model)), count_ops(step(wrapper))
    assert copied_ops < plain_ops - len(wrapper.master), (copied_ops, plain_ops)


def test_model_without_linear_or_conv_is_called_as_it_is():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    wrapper = BF16Weights(model)
    x = torch.randn(2, 4)
    assert wrapper.master == [] and torch.equal(wrapper(x), model(x))


class PlainAutocast(torch.nn.Module):
    """What the engine ran before BF16Weights: the model itself under autocast."""

    def __init__(self, model, frozen=False):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def grads_to_master(self):
        pass


def test_amp_distillation_trial_is_bitwise_the_plain_autocast_trial(tiny_data_root, tmp_path_factory, monkeypatch):
    """The engine's bf16 path (student and teacher on weight copies), forced on the CPU's autocast, trains
    bitwise the weights plain autocast trains."""
    from conftest import tiny_distill_trial
    from trainers import accel, engine
    from trainers.accel import bf16_weights, training
    config = tiny_distill_trial(tiny_data_root, tmp_path_factory)
    config = config.model_copy(update={"model": config.model.model_copy(update={"dropout": 0.0})})
    monkeypatch.setattr(engine, "amp_enabled", lambda schedule, device: schedule.amp)
    wrapped = []
    monkeypatch.setattr(bf16_weights.BF16Weights, "refresh",
                        lambda self, refresh=bf16_weights.BF16Weights.refresh: (wrapped.append(self.frozen),
                                                                                refresh(self)))
    weights = {}
    for kind in ("copies", "plain", "fp32"):
        if kind == "plain":  # the student's copies (made per epoch) and the teacher's (accel.for_inference)
            monkeypatch.setattr(training, "BF16Weights", PlainAutocast)
            monkeypatch.setattr(accel, "BF16Weights", PlainAutocast)
        if kind == "fp32":
            monkeypatch.setattr(engine, "amp_enabled", lambda schedule, device: False)
        workdir = tmp_path_factory.mktemp(f"amp-{kind}")
        engine.run_trial(config, workdir, log=lambda s: None)
        weights[kind] = torch.load(workdir / "checkpoint.pt", weights_only=False)["model"]
        if kind == "copies":  # the student refreshed every step (16 images, batches of 4), the teacher once
            assert wrapped.count(False) == 4 and wrapped.count(True) == 1
    assert all(torch.equal(weights["copies"][k], weights["plain"][k]) for k in weights["plain"])
    # and autocast was on: the same trial in float32 trains other weights
    assert not all(torch.equal(weights["fp32"][k], weights["plain"][k]) for k in weights["plain"])


def test_a_parameter_shared_by_two_modules_gets_one_copy_and_both_gradients():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    second.weight = first.weight  # tied
    model = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    wrapper = BF16Weights(model)
    assert len(wrapper.master) == 3  # the shared weight once, two biases
    x = torch.randn(3, 4)
    with autocast():
        plain = model(x).float().square().sum()
    plain.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with autocast():
        copied = wrapper(x).float().square().sum()
    copied.backward()
    wrapper.grads_to_master()
    assert torch.equal(plain, copied)
    assert all(torch.equal(a, p.grad) for a, p in zip(expected, model.parameters()))
