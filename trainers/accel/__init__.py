"""The GPU machinery of training, behind one door: how a step runs fast, not what it computes.

At the batch sizes of detection training a GPU step waits on its host, which issues its kernels one by one
and solves its Hungarian assignments. What is here takes host work out of the step or hides it: bf16 weight
copies (bf16_weights), CUDA graphs (cuda_graphs, graphed_model, graphed_teacher), torch.compile and the
attention kernels (kernels), a distillation teacher run one batch ahead (teacher_ahead), host copies and
assignment solves that do not wait for the device (host), and the loss values read a step late (readback).
Its switches are RuntimeConfig's, outside a trial's identity; where one changes random draws or rounding,
its description says so.

What the rest of trainers calls (the engine, the distillation objective's builder, the matching):
    prepare(model, loss_fn, optimizer, runtime, device, amp, compiled, error) -> training.Accelerated
    wrap_teacher(teacher, runtime, amp)      the frozen teacher as a step calls it
    for_inference(model, amp)                a model as a no-grad forward calls it (evaluation, a teacher)
    compile_model(model), select_attention_kernels(device)
    start_on_host(solve, *tensors)           an assignment solved on the host beside the step (matching, logits)
"""
import torch

from trainers.accel.bf16_weights import BF16Weights
from trainers.accel.graphed_teacher import GraphedTeacher
from trainers.accel.host import start_on_host
from trainers.accel.kernels import compile_model, select_attention_kernels
from trainers.accel.training import Accelerated

__all__ = ["prepare", "wrap_teacher", "for_inference", "compile_model", "select_attention_kernels",
           "start_on_host"]


def prepare(model, loss_fn, optimizer, runtime, device: torch.device, amp: bool, compiled=None,
            error: type[Exception] = RuntimeError) -> Accelerated:
    """One epoch's training machinery for `model` (in train mode) and `loss_fn` (the objective): `.model` and
    `.loss_fn` as a step calls them, `.batches(loader)` on the device, `.check(losses, where)` after the
    forward (the deferred finiteness check, which raises `error`), `.after_backward()`, `.finish()` after the
    epoch's last step, `.sums` of the logged losses. runtime: the trial's RuntimeConfig; amp: bf16 autocast on;
    compiled: the model through compile_model (made once per trial, not per epoch)."""
    return Accelerated(model, loss_fn, optimizer, runtime, device, amp, compiled, error)


def wrap_teacher(teacher: torch.nn.Module, runtime, amp: bool) -> torch.nn.Module:
    """A frozen distillation teacher as a step calls it: compiled (runtime.compile; then on autocast alone),
    else on bf16 copies of its weights made once (amp), its forward replayed from CUDA graphs with
    runtime.teacher_cuda_graph."""
    if runtime.compile:
        return compile_model(teacher)
    teacher = for_inference(teacher, amp)
    return GraphedTeacher(teacher) if runtime.teacher_cuda_graph else teacher


def for_inference(model: torch.nn.Module, amp: bool) -> torch.nn.Module:
    """`model` for forwards without gradients: under amp on bf16 copies of its weights, made once (not per
    call); refresh() them after its weights change."""
    return BF16Weights(model, frozen=True) if amp else model
