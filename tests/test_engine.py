"""The engine: exact resume, NaN handling, optimizer groups, lr schedule, metrics reporting."""
import math

import pytest
import torch

from conftest import tiny_trial
from trainers.checkpoint import load_checkpoint, load_detector
from trainers.config import RuntimeConfig, ScheduleConfig
from trainers.criterion import SetCriterion
from trainers.engine import NonFiniteLossError, lr_factor, param_groups, run_trial
from trainers.models import build_detector

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class Interrupt(Exception):
    pass


def _quiet(_):
    pass


@pytest.mark.parametrize("family", ["conditional_detr", "deformable_detr"])
def test_resume_is_bitwise_identical(tiny_data_root, tmp_path, family):
    config = tiny_trial(tiny_data_root, family, epochs=2)
    reports = []
    final = run_trial(config, tmp_path / "straight", report=lambda m, c: reports.append((m, c)), log=_quiet)
    assert [m["epoch"] for m, _ in reports] == [1, 2]
    assert all(k in final for k in METRICS) and all(0.0 <= final[k] <= 1.0 for k in METRICS)
    assert reports[-1][1] == tmp_path / "straight" / "checkpoint.pt"

    def stop_after_first_epoch(metrics, checkpoint):
        if metrics["epoch"] == 1:
            raise Interrupt  # as if the process died right after the epoch-1 checkpoint
    with pytest.raises(Interrupt):
        run_trial(config, tmp_path / "resumed", report=stop_after_first_epoch, log=_quiet)
    after_first_epoch = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert after_first_epoch["epoch"] == 0
    resumed_reports = []
    run_trial(config, tmp_path / "resumed", report=lambda m, c: resumed_reports.append(m), log=_quiet)
    assert [m["epoch"] for m in resumed_reports] == [2]  # epoch 1 was not trained again

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resume"
    assert a["history"][-1]["train/loss"] == b["history"][-1]["train/loss"]
    # a finished trial keeps weights only, and running it again trains nothing and returns its last metrics
    assert "optimizer" not in a and "optimizer" in after_first_epoch
    again = []
    assert run_trial(config, tmp_path / "straight", report=lambda m, c: again.append(m), log=_quiet) == final
    assert again == []


def test_compiled_training_is_wired_and_trains_the_same_weights(tiny_data_root, tmp_path, monkeypatch):
    """runtime.compile: the loss calls the compiled model (every step through it: one compilation per input
    shape, at most), and what trains, resumes and is saved is the model itself. Compiled with dynamo's eager
    backend (the graph runs the same operators; inductor would compile for minutes here), the weights are
    bitwise those of the eager run."""
    from torch._dynamo.utils import counters
    from trainers import accel
    config = tiny_trial(tiny_data_root, epochs=2)
    run_trial(config, tmp_path / "eager", log=_quiet)
    calls = []

    def compile_eager(model):
        compiled = torch.compile(model, backend="eager")
        return lambda *a, **kw: (calls.append(1), compiled(*a, **kw))[1]
    monkeypatch.setattr(accel, "compile_model", compile_eager)
    compiled = config.model_copy(update={"runtime": config.runtime.model_copy(update={"compile": True})})
    counters.clear()
    run_trial(compiled, tmp_path / "compiled", log=_quiet)
    steps = len(load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["history"]) * 4  # 16 images in 4s
    assert len(calls) == steps
    assert 0 < counters["stats"]["unique_graphs"] and not counters["graph_break"]  # traced whole, not skipped
    a = load_checkpoint(tmp_path / "eager" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_the_trial_with_its_reason(tiny_data_root, tmp_path):
    config = tiny_trial(tiny_data_root, epochs=3, schedule=ScheduleConfig(epochs=3, lr=1e30, batch_size=4,
                                                                              grad_clip=0))
    with pytest.raises(NonFiniteLossError, match=r"epoch \d, step \d: loss became (nan|inf)"):
        run_trial(config, tmp_path / "nan", log=_quiet)


def test_a_non_finite_loss_stops_at_its_step_with_the_weights_before_it(tiny_data_root):
    """The loss's finiteness is read one step late (on a GPU reading it at once would hold the host before
    the backward): a NaN loss at step 3 fails the epoch naming step 3, and its update was skipped on the
    device (the optimizer's found_inf), so model and optimizer state are those after step 2."""
    import itertools
    from trainers.engine import DetectionLoss, build_loaders, train_one_epoch
    from trainers.models import build_detector
    config = tiny_trial(tiny_data_root, epochs=1)
    torch.manual_seed(0)
    train_set, _, loader, _, _ = build_loaders(config)
    batches, classes = list(itertools.islice(loader, 4)), train_set.num_classes
    cpu = torch.device("cpu")

    def run(steps, nan_at=None):
        torch.manual_seed(0)
        model = build_detector(config.model, classes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
        detection, calls = DetectionLoss(SetCriterion(classes)), []

        def loss_fn(*args):
            losses = detection(*args)
            calls.append(1)
            if len(calls) == nan_at:
                losses["loss"] = losses["loss"] * float("nan")
            return losses
        error = None
        try:
            train_one_epoch(model, loss_fn, batches[:steps], optimizer, scheduler, cpu, config, 0, _quiet)
        except NonFiniteLossError as e:
            error = str(e)
        return model, optimizer, error, len(calls)
    plain, plain_opt, error, _ = run(2)
    assert error is None
    stopped, stopped_opt, error, calls = run(4, nan_at=3)
    assert error is not None and "epoch 1, step 3: loss became nan" in error and calls == 4
    # parameters (batch norm's running statistics move with every training forward, steps 3 and 4's too)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), stopped.parameters()))
    for a, b in zip(plain_opt.state.values(), stopped_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert "found_inf" not in vars(plain_opt)
    # at the epoch's last step: read before the epoch ends
    _, _, error, _ = run(3, nan_at=3)
    assert error is not None and "epoch 1, step 3" in error


def test_checkpoint_rebuilds_the_trained_detector(tiny_data_root, tmp_path):
    config = tiny_trial(tiny_data_root, epochs=1)
    run_trial(config, tmp_path / "t", log=_quiet)
    model, meta = load_detector(tmp_path / "t" / "checkpoint.pt")
    assert not model.training and meta["category_ids"] == list(range(1, 11))
    images = torch.randn(1, 3, 64, 64)
    out = model(images)
    assert out.logits.shape == (1, 1, 10, 10) and torch.isfinite(out.boxes).all()


def test_param_groups_follow_the_recipe():
    from trainers.config import ModelConfig
    model = build_detector(ModelConfig(family="deformable_detr", backbone="resnet18", backbone_norm="frozen_bn",
                                       encoder_layers=1,
                                       decoder_layers=1, num_queries=5, hidden_dim=64, num_feature_levels=2), 3)
    schedule = ScheduleConfig(lr=2e-4)
    groups = {g["name"]: g for g in param_groups(model, schedule)}
    assert groups["backbone"]["lr"] == pytest.approx(2e-5)
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    assert groups["default"]["lr"] == pytest.approx(2e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]
               for p in groups["linear_proj"]["params"])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("backbone.stages.0.0.") for n in frozen)  # stem + layer1 never train
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == sum(p.requires_grad for p in model.parameters())


def test_lr_schedule_warmup_then_step_decay():
    """MMDetection's linear warm-up: lr x (1 - (1 - ratio) (1 - i / W)) for iteration i < W (the official run:
    ratio 0.001, W 500), then the step decay."""
    f = lr_factor(ScheduleConfig(warmup_iters=4, warmup_ratio=0.2, lr_drop_epochs=[2, 3], lr_drop_factor=0.1),
                  iters_per_epoch=10)
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f(19) == 1.0 and f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.01)
    official = lr_factor(ScheduleConfig(warmup_iters=500), iters_per_epoch=7330)
    assert [official(i) for i in (0, 250, 499, 500)] == pytest.approx([0.001, 0.5005, 1 - 0.999 / 500, 1.0])
    assert math.isclose(lr_factor(ScheduleConfig(lr_drop_epochs=[]), 5)(1000), 1.0)


def test_loss_sums_on_the_device_equal_python_float_sums():
    """The epoch's loss sums stay on the device (no sync per step) and are the same numbers as summing each
    term's float() in Python: float32 values convert exactly and both add in float64 in the same order."""
    from trainers.accel.readback import LossSums
    g = torch.Generator().manual_seed(0)
    sums, reference = LossSums(), {}
    for step in range(200):
        losses = {"loss": torch.rand((), generator=g) * 10 ** torch.randint(-3, 3, ()).item(),
                  "loss_cls": torch.rand(1, generator=g)[0], "count": step % 3}  # a plain number too
        if step >= 150:  # a term appears: the sums so far are kept
            losses["kd_logits"] = torch.rand((), generator=g)
        sums.add(losses)
        for k, v in losses.items():
            reference[k] = reference.get(k, 0.0) + float(v)
    assert sums.totals() == reference
    assert sums.sum.dtype == torch.float64 and sums.names == ["loss", "loss_cls", "kd_logits"]


def test_graphed_model_off_cuda_is_the_model_and_compile_excludes_it():
    """runtime.cuda_graph: GraphedModel replays graphs only on CUDA in training (tests/test_gpu.py -k
    graphed); on the CPU a training step through it is the model's own, loss and gradients bitwise, and
    nothing is captured. compile and cuda_graph together are refused."""
    import copy
    from trainers.config import ModelConfig
    from trainers.engine import DetectionLoss
    from trainers.accel.graphed_model import GraphedModel
    torch.manual_seed(0)
    model = build_detector(ModelConfig(family="deformable_detr", backbone="resnet18", encoder_layers=1,
                                       decoder_layers=2, num_queries=8, hidden_dim=32, num_heads=4, ffn_dim=32,
                                       num_feature_levels=2, dropout=0.0), 3).train()
    twin = copy.deepcopy(model)
    images, mask = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[0, :, 70:] = True
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    wrapper = GraphedModel(twin)
    losses = [DetectionLoss(SetCriterion(3))(m, images, mask, targets)["loss"] for m in (model, wrapper)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
    assert wrapper.graphs == {} and wrapper.seen == set()
    with pytest.raises(ValueError, match="choose one"):
        RuntimeConfig(compile=True, cuda_graph=True)


def test_shape_graphs_capture_a_shape_the_second_time_keep_the_recent_ones_and_stop_when_shapes_vary():
    """The capture policy of the CUDA-graph wrappers (accel.cuda_graphs.ShapeGraphs), with captures that make labels:
    a key's first call runs eagerly, its second captures, later ones replay; the least recently used graph goes
    beyond max_graphs; a capture that raises, or keys cycling through more shapes than are kept (a capture
    every few calls, each costing about two eager ones), stop capturing for good, with a warning."""
    from trainers.accel.cuda_graphs import ShapeGraphs
    made = []

    def capture(key):
        return lambda: made.append(key) or f"graph {key} #{len(made)}"
    cache = ShapeGraphs(max_graphs=2)
    assert cache._graph_for("a", capture("a")) is None and made == []
    assert cache._graph_for("a", capture("a")) == "graph a #1"
    assert cache._graph_for("a", capture("a")) == "graph a #1" and made == ["a"]
    for key in "bcb":
        cache._graph_for(key, capture(key))
        cache._graph_for(key, capture(key))
    assert list(cache.graphs) == ["c", "b"] and made == ["a", "b", "c"] and cache.stopped is None

    def boom():
        raise RuntimeError("operation not permitted when stream is capturing")
    cache._graph_for("d", boom)
    with pytest.warns(RuntimeWarning, match="capture failed: RuntimeError: operation not permitted"):
        assert cache._graph_for("d", boom) is None
    assert cache.stopped and cache.graphs == {}

    cycling = ShapeGraphs(max_graphs=1)
    # two first calls run eagerly, then every call captures (the other key's graph just evicted), none replays
    calls = [cycling._graph_for(key, capture(key)) for key in "ab" * (ShapeGraphs.THRASH_CAPTURES // 2 + 1)]
    assert cycling.captures == ShapeGraphs.THRASH_CAPTURES and cycling.replays == 0 and cycling.stopped is None
    assert calls[:2] == [None, None] and None not in calls[2:]
    with pytest.warns(RuntimeWarning, match="input shapes vary too much: 8 captures, 0 replays"):
        assert cycling._graph_for("a", capture("a")) is None
    assert cycling.graphs == {} and cycling._graph_for("b", capture("b")) is None
    assert cycling.captures == ShapeGraphs.THRASH_CAPTURES


def test_loaders_pad_batches_to_the_size_divisor(tiny_data_root):
    """data.pad_size_divisor: every training and validation batch is padded up to multiples of it (few batch
    shapes, for CUDA graphs), the padding marked in the mask; 1 (the default) pads to the largest image only."""
    from trainers.engine import build_loaders
    config = tiny_trial(tiny_data_root)  # multi-scale: 80 or 96 px and the crop branch's sizes
    shapes = {}
    for divisor in (1, 64):
        data = config.data.model_copy(update={"pad_size_divisor": divisor})
        _, _, train, val, gen = build_loaders(config.model_copy(update={"data": data}))
        gen.manual_seed(0)
        batches = list(train) + list(val)
        shapes[divisor] = {tuple(images.shape[-2:]) for images, _, _ in batches}
        for images, mask, _ in batches:
            assert mask.shape == images.shape[:1] + images.shape[-2:]
            assert all(s % divisor == 0 for s in images.shape[-2:])
            assert not images.masked_select(mask[:, None]).any()  # padding is zeros and marked
    assert shapes[64] == {(128, 128)} and len(shapes[1]) > 1


@pytest.mark.parametrize("family", ["conditional_detr", "deformable_detr", "adamixer"])
def test_a_forward_copies_nothing_from_the_host_at_a_shape_seen_before(family, monkeypatch):
    """What a CUDA graph capture needs of a forward besides never waiting (tests/test_fake_cuda.py): no copy from
    the host, whose buffer a replay would read again. The constants a forward makes (deformable attention's level
    sizes, AdaMixer's scales) are cached per shape: at a shape seen before, a training forward with the extra
    query group and an evaluation forward copy nothing (at a new one, the families with constants do)."""
    from trainers.config import ModelConfig
    from trainers.models import constants
    from trainers.models.output import QueryGroup
    copies = []
    copy = constants.host_to_device
    monkeypatch.setattr(constants, "host_to_device", lambda t, d: (copies.append(tuple(t.shape)), copy(t, d))[1])
    kw = dict(family=family, backbone="resnet18", decoder_layers=2, num_queries=6, hidden_dim=32, num_heads=4,
              ffn_dim=32, dropout=0.0)
    if family != "adamixer":
        kw.update(encoder_layers=1, num_feature_levels=2)
    model = build_detector(ModelConfig(**kw), 3)
    images, mask = torch.randn(2, 3, 72, 88), torch.zeros(2, 72, 88, dtype=torch.bool)  # a shape no other test uses
    mask[1, :, 80:] = True
    group = QueryGroup(**{k: v.detach() for k, v in vars(model(images, mask).queries).items() if v is not None})
    first = len(copies)
    assert first > 0 or family == "conditional_detr"
    model.train()(images, mask, queries=group).logits.sum().backward()
    with torch.no_grad():
        model.eval()(images, mask)
    assert copies[first:] == []
