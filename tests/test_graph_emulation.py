"""The CUDA-graph wrappers (runtime.cuda_graph: accel.graphed_model.GraphedModel; runtime.teacher_cuda_graph:
accel.graphed_teacher.GraphedTeacher) on the CPU, their graphs emulated (graph_emulation.py: a replay runs
the captured operators again on the captured tensors). What the wrappers do around a capture is then tested
in every session: static inputs filled, outputs rebuilt from replayed tensors, weights read in place, each
weight's gradient set from the backward graph, graphs kept and dropped. The same scenarios on a GPU's real
graphs: tests/test_gpu.py -k graph."""
import copy
import warnings

import pytest
import torch

from graph_emulation import emulated_cuda_graphs
from test_gpu import FAMILIES, _assert_same_training, _train_steps, batch, count_captures, small
from trainers.accel.bf16_weights import BF16Weights
from trainers.accel.graphed_model import GraphedModel
from trainers.accel.graphed_teacher import GraphedTeacher
from trainers.config import DistillConfig
from trainers.criterion import SetCriterion
from trainers.distill.objective import DistillationLoss
from trainers.engine import DetectionLoss
from trainers.models import build_detector
from trainers.models.output import tensors_in

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def graphs(monkeypatch):
    emulated_cuda_graphs(monkeypatch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without CUDA graphs")  # a capture failed (cuda_graphs.py)
        yield


def _assert_same(expected, got, what):
    pairs = list(zip(tensors_in(expected), tensors_in(got), strict=True))
    for i, (a, b) in enumerate(pairs):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), (what, i)


def _cropped(data):
    """A second input shape."""
    return (data[0][:, :, :64, :96].contiguous(), data[1][:, :64, :96].contiguous(), *data[2:])


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-copies"])
@pytest.mark.parametrize("family", FAMILIES)
def test_emulated_teacher_graph_replays_the_eager_forward(family, amp):
    """A shape's first call eager, its second captured, later ones replayed; two shapes alternate; each output
    equals the eager teacher's on the same input, and an output kept from an earlier call keeps its values
    after later replays; a third shape drops the least recently used graph. amp: on the teacher's bf16 weight
    copies under the CPU's bf16 autocast."""
    torch.manual_seed(0)
    teacher = build_detector(small(family, "resnet34"), 5).eval()
    if amp:
        teacher = BF16Weights(teacher, frozen=True)
    graphed = GraphedTeacher(teacher, max_graphs=2)
    inputs = {"a": [batch(CPU, seed)[:2] for seed in range(4)],
              "b": [_cropped(batch(CPU, seed))[:2] for seed in range(4, 7)]}
    kept = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for i, shape in enumerate(["a", "a", "a", "b", "b", "a", "b"]):
            images, mask = inputs[shape].pop(0)
            got = graphed(images, mask)
            expected = teacher(images, mask)
            _assert_same(expected, got, (i, shape))
            kept.append((expected, got))
        assert (graphed.captures, graphed.replays, len(graphed.graphs)) == (2, 3, 2)
        for i, (expected, got) in enumerate(kept):
            _assert_same(expected, got, ("kept", i))
        key_a = next(iter(graphed.graphs))
        images, mask = (t[:1] for t in batch(CPU, 7)[:2])  # a third shape
        graphed(images, mask)
        graphed(images, mask)
        assert len(graphed.graphs) == 2 and key_a not in graphed.graphs


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-copies"])
@pytest.mark.parametrize("family", FAMILIES)
def test_emulated_graphed_training_steps_equal_eager_steps(family, amp):
    """The training forward and backward replayed train as the eager steps do: six steps over two input shapes
    (each captured at its second step, the first again after the second's capture); amp: inside bf16 weight
    copies (refreshed in place, which the graphs read) under the CPU's bf16 autocast. Not bitwise: an output's
    incoming gradient is copied into the graph's buffer, in the output's layout, and a reduction over another
    layout may round otherwise (a bias gradient by 1 ulp with one thread here); the rest is."""
    torch.manual_seed(0)
    eager = build_detector(small(family), 5).train()
    graphed = copy.deepcopy(eager)
    a = [batch(CPU, seed) for seed in range(4)]
    b = [_cropped(batch(CPU, seed)) for seed in range(4, 6)]
    batches = [(*x, None) for x in (a[0], a[1], a[2], b[0], b[1], a[3])]
    wrapper = GraphedModel(graphed)
    forwards = (BF16Weights(eager), BF16Weights(wrapper)) if amp else (eager, wrapper)
    eager_losses = _train_steps(forwards[0], eager, DetectionLoss(SetCriterion(5)), batches, amp)
    graphed_losses = _train_steps(forwards[1], graphed, DetectionLoss(SetCriterion(5)), batches, amp)
    assert (wrapper.captures, wrapper.replays, len(wrapper.graphs)) == (2, 2, 2)
    _assert_same_training(eager_losses, graphed_losses, eager, graphed, 1e-3 if amp else 1e-5)


@pytest.mark.parametrize("teacher_thread", [False, True], ids=["run-ahead", "thread"])
@pytest.mark.parametrize("family", FAMILIES)
def test_emulated_graphed_distillation_steps_equal_eager_steps(family, teacher_thread):
    """A DETRDistill step with the teacher's forward run ahead on the next batch (thread: by the helper thread,
    which captures the teacher's graph beside this thread's step) and both switches: the student's forward and
    backward, the query-prior group among its graph's inputs, and the teacher's forward replayed give the
    eager steps' losses and weights (as close as in the test above)."""
    torch.manual_seed(0)
    teacher = build_detector(small(family, "resnet34"), 5)
    eager = build_detector(small(family), 5).train()
    graphed = copy.deepcopy(eager)
    data = [batch(CPU, seed) for seed in range(6)]
    batches = [(*data[i], data[i + 1][:2]) for i in range(5)]
    results, wrappers = [], None
    for student in (eager, graphed):
        torch.manual_seed(1)  # the feature adapters' init
        t = GraphedTeacher(teacher) if student is graphed else teacher
        loss_fn = DistillationLoss(t, SetCriterion(5), DistillConfig(method="detrdistill"), 64, 64, 2, 2,
                                   student.config.levels)
        forward = GraphedModel(student) if student is graphed else student
        results.append(_train_steps(forward, student, loss_fn, batches, amp=False, thread=teacher_thread))
        wrappers = (forward, t)
    student_graphs, teacher_graphs = wrappers
    assert (student_graphs.captures, student_graphs.replays) == (1, 3)
    assert (teacher_graphs.captures, teacher_graphs.replays) == (1, 4)
    _assert_same_training(results[0], results[1], eager, graphed, 1e-5)


def test_a_capture_that_reads_a_result_on_the_host_leaves_the_module_eager():
    """An operator that hands the host a GPU result is refused in capture (here by the emulation, as by CUDA):
    the capture fails, the wrapper says so once and runs the module eagerly, with the same outputs."""

    class ReadsOnHost(torch.nn.Module):
        def forward(self, images, mask):
            return images * float(images.abs().max())  # .item(): the host waits

    graphed = GraphedTeacher(ReadsOnHost())
    images = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = [graphed(images + i, None) for i in range(4)]
    assert graphed.stopped.startswith("capture failed: RuntimeError: operation not permitted when stream is capturing")
    assert [str(w.message) for w in caught if "without CUDA graphs" in str(w.message)] == [
        f"teacher_cuda_graph (the teacher's forward): {graphed.stopped}; it runs without CUDA graphs from now on"]
    for i, out in enumerate(outs):
        assert torch.equal(out, (images + i) * float((images + i).abs().max()))


@pytest.mark.parametrize("overlap", ["off", "thread"])
def test_emulated_trial_with_both_graphs_trains_and_evaluates_as_the_eager_trial(tiny_data_root, tmp_path,
                                                                               tmp_path_factory, monkeypatch,
                                                                               overlap):
    """A DETRDistill trial (two epochs, one input shape: one scale, no crop; dropout 0) with runtime.cuda_graph
    and teacher_cuda_graph, the graphs emulated: both capture (the student once per epoch, its wrapper made per
    epoch), nothing warns, and the trial ends with the eager trial's losses, weights and AP (as close as in the
    tests above; thread: the teacher run ahead and captured by the helper thread)."""
    from conftest import tiny_distill_trial
    from trainers.checkpoint import load_checkpoint
    from trainers.engine import run_trial
    captures = count_captures(monkeypatch)
    config = tiny_distill_trial(tiny_data_root, tmp_path_factory)
    augment = config.data.augment.model_copy(update={"scales": [96], "crop": False, "max_size": 96})
    config = config.model_copy(update={
        "data": config.data.model_copy(update={"augment": augment}),
        "runtime": config.runtime.model_copy(update={"overlap_teacher": overlap}),
        "model": config.model.model_copy(update={"dropout": 0.0}),
        "schedule": config.schedule.model_copy(update={"epochs": 2})})
    reports = {}
    for mode in ("eager", "graphs"):
        switches = {"cuda_graph": mode == "graphs", "teacher_cuda_graph": mode == "graphs"}
        trial = config.model_copy(update={"runtime": config.runtime.model_copy(update=switches)})
        reports[mode] = []
        run_trial(trial, tmp_path / mode, report=lambda m, c: reports[mode].append(m), log=lambda s: None)
    assert captures == {"student": 2, "teacher": 1}, captures
    for eager, graphs in zip(reports["eager"], reports["graphs"], strict=True):
        assert eager.keys() == graphs.keys()
        for k in eager.keys() - {"epoch_time"}:
            assert graphs[k] == pytest.approx(eager[k], rel=1e-5, abs=1e-6), k
    eager, graphs = (load_checkpoint(tmp_path / mode / "checkpoint.pt")["model"] for mode in ("eager", "graphs"))
    for k in eager:
        assert torch.allclose(eager[k].double(), graphs[k].double(), rtol=1e-5, atol=1e-6), k
