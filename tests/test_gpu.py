"""The same code on CUDA: forward equal to the CPU's, bf16 training steps finite and close to fp32, the
distillation terms equal to the CPU's, a whole trial (amp) that trains, evaluates and resumes.

Run on a machine with a GPU: `pytest -m gpu tests/test_gpu.py` (benchmarks/gpu_check.sh does). Without CUDA
these tests are skipped: there is nothing to compare."""
import math

import pytest
import torch

from conftest import tiny_trial
from trainers.config import DistillConfig, ModelConfig
from trainers.criterion import SetCriterion
from trainers.distill.objective import DistillationLoss
from trainers.engine import DetectionLoss, run_trial
from trainers.models import build_detector
from trainers.models.output import tensors_in
from trainers.models.transformer_layers import set_bf16_layer_norm
from test_ms_deform_attn import SHAPES, random_inputs, reference_core
from trainers.models.ms_deform_attn import ms_deform_attn_core

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FAMILIES = ["conditional_detr", "deformable_detr", "adamixer"]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 comparisons mean fp32: no TF32 matmuls or convolutions."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def small(family, backbone="resnet18", hidden=64):
    kw = dict(family=family, backbone=backbone, decoder_layers=2, num_queries=12, hidden_dim=hidden, num_heads=4,
              ffn_dim=128, dropout=0.0)
    if family != "adamixer":
        kw["encoder_layers"] = 2
    if family == "deformable_detr":
        kw["num_feature_levels"] = 3
    return ModelConfig(**kw)


def batch(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True  # padding in the second image
    targets = [{"labels": torch.randint(0, 5, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25, torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1),
                "size": torch.tensor([96, 128])} for n in (3, 2)]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images.to(device), mask.to(device), targets


def test_ms_deform_attn_core_on_cuda_equals_float64_loop():
    value, locations, weights = random_inputs(torch.float64)
    out = ms_deform_attn_core(value.to(CUDA), SHAPES, locations.to(CUDA), weights.to(CUDA)).cpu()
    assert (out - reference_core(value, SHAPES, locations, weights)).abs().max().item() < 1e-12


def test_host_to_device_does_not_wait_for_queued_kernels():
    """The step's small host -> GPU copies (constants, matched indices, a pinned batch) go through pinned
    memory: the host returns while earlier kernels still run, and the values arrive."""
    from trainers.models.constants import device_constant, host_to_device
    host_to_device(torch.arange(6), CUDA)  # the pinned-memory cache's first blocks (allocating them may sync)
    device_constant([[0.0, 0.0]], torch.zeros(1, device=CUDA))
    torch.cuda.synchronize()
    torch.cuda._sleep(int(5e8))  # a kernel that spins long enough to be still running below
    copied = host_to_device(torch.arange(6).view(2, 3), CUDA)
    constant = device_constant([[1.5, 2.5]], copied.float())
    assert not torch.cuda.current_stream().query(), "the host waited for the queued kernel"
    assert torch.equal(copied.cpu(), torch.arange(6).view(2, 3))
    assert torch.equal(constant.cpu(), torch.tensor([[1.5, 2.5]]))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_on_cuda_equals_cpu(family):
    torch.manual_seed(0)
    model = build_detector(small(family), 5).eval()
    images, mask, _ = batch("cpu")
    with torch.no_grad():
        cpu = model(images, mask).predictions
        gpu = model.to(CUDA)(images.to(CUDA), mask.to(CUDA)).predictions
    assert (gpu.logits.cpu() - cpu.logits).abs().max().item() < 1e-3
    assert (gpu.boxes.cpu() - cpu.boxes).abs().max().item() < 1e-4


@pytest.mark.parametrize("bf16_norms", [False, True], ids=["norms-fp32", "norms-bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_train_steps_are_finite_and_close_to_fp32(family, bf16_norms):
    """Also with schedule.amp_layer_norm bfloat16 (LayerNorm outputs bf16: a bf16 residual stream)."""
    torch.manual_seed(0)
    model = build_detector(small(family), 5).to(CUDA).train()
    set_bf16_layer_norm(model, bf16_norms)
    loss_fn = DetectionLoss(SetCriterion(5))
    images, mask, targets = batch(CUDA)
    fp32 = loss_fn(model, images, mask, targets)["loss"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = loss_fn(model, images, mask, targets)["loss"]
    assert bf16.dtype == torch.float32  # losses are computed in float32 under autocast
    assert math.isfinite(bf16.item()) and abs(bf16.item() - fp32.item()) < 0.05 * fp32.item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, images, mask, targets)["loss"]
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_weight_copies_on_cuda_give_autocast_values(family):
    """BF16Weights on CUDA (the engine's bf16 path): the forward is bitwise plain autocast's, and a step's
    gradients match it (CUDA backward kernels may sum in another order; the CPU test is bitwise). A forward
    failure names the first module whose output differs, and whether plain autocast itself repeats bitwise."""
    from trainers.accel.bf16_weights import BF16Weights
    torch.manual_seed(0)
    model = build_detector(small(family), 5).to(CUDA).train()
    wrapper = BF16Weights(model)
    images, mask, _ = batch(CUDA)
    runs = {}
    for name, forward in (("plain", model), ("plain again", model), ("copies", wrapper)):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            runs[name] = _module_outputs(model, lambda: forward(images, mask).predictions)
    assert _first_difference(runs["plain"], runs["copies"]) is None, (
        f"copies vs plain: {_first_difference(runs['plain'], runs['copies'])}; "
        f"plain vs plain again: {_first_difference(runs['plain'], runs['plain again'])}")
    # Gradients of a smooth function of every prediction (the set loss's Hungarian matching would turn a last-
    # bit difference anywhere into another assignment). grid_sample's backward adds with atomics, so on CUDA
    # even plain autocast need not repeat bitwise: the copies must stay within 1% of plain autocast, or
    # within three times its own run-to-run spread, whichever is larger.
    grads = []
    names = [n for n, p in model.named_parameters()]
    for forward in (model, model, wrapper):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = forward(images, mask).predictions
            loss = pred.logits.float().square().mean() + pred.boxes.float().square().mean()
        loss.backward()
        if forward is wrapper:
            wrapper.grads_to_master()
        grads.append({n: p.grad.clone() for n, p in zip(names, model.parameters()) if p.grad is not None})
    plain, again, copies = grads
    assert plain.keys() == again.keys() == copies.keys() and plain
    assert all(g.dtype == torch.float32 for g in copies.values())

    def spread(other):  # (largest difference from plain relative to the parameter's scale, that parameter)
        return max((((plain[n] - other[n]).abs().max() / (plain[n].abs().max() + 1e-6)).item(), n) for n in plain)
    assert spread(copies)[0] <= max(1e-2, 3 * spread(again)[0]), f"copies {spread(copies)}, plain again {spread(again)}"


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_training_forward_on_cuda_equals_eager(family):
    """runtime.compile on CUDA (accel.compile_model: inductor, Triton kernels): a training forward and
    backward give the eager model's predictions, and its gradients as closely as the eager model's own
    gradients repeat when its input moves by one part in a million, at the first input shape and at a
    second one, which compiles with dynamic sizes.

    Why not a fixed tolerance: fused kernels sum in another order (last-bit differences), and a detection
    step's gradients are not smooth in its input - the stem's max pooling routes each gradient to one of
    near-tied inputs, bilinear sampling's gradient jumps at pixel boundaries - so a last-bit difference moves
    some parameters' gradients by percents in the eager model too."""
    from trainers.accel import compile_model
    torch.manual_seed(0)
    model = build_detector(small(family), 5).train()
    with torch.no_grad():  # off the initial grid: sampling offsets start at zero weight, so every sampling
        # point would sit on a pixel-grid position, where bilinear sampling's gradient jumps
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = model.to(CUDA)
    compiled = compile_model(model)

    def run(forward, images, mask):
        model.zero_grad(set_to_none=True)
        pred = forward(images, mask).predictions
        (pred.logits.square().mean() + pred.boxes.square().mean()).backward()
        return pred.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def distance(a, b):  # per parameter, and over all: |a - b| / |a| (L2), a parameter's floored at 1e-3 of
        # the largest gradient (some are zero but for rounding: attention's key biases)
        floor = 1e-3 * max(g.norm().item() for g in a.values())
        per = {n: ((a[n] - b[n]).norm() / (a[n].norm() + floor)).item() for n in a}
        total = math.sqrt(sum((a[n] - b[n]).square().sum().item() for n in a) /
                          sum(a[n].square().sum().item() for n in a))
        return per, total
    images, mask, _ = batch(CUDA)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1)).to(CUDA)
    for images, mask, noise in ((images, mask, noise), (images[:, :, :80, :112].contiguous(),
                                                        mask[:, :80, :112].contiguous(), noise[:, :, :80, :112])):
        shape = tuple(images.shape)
        (eager_logits, eager), (compiled_logits, grads) = run(model, images, mask), run(compiled, images, mask)
        _, nudged = run(model, images * (1 + 1e-6 * noise), mask)
        assert (compiled_logits - eager_logits).abs().max().item() < 1e-4, shape
        assert eager.keys() == grads.keys() == nudged.keys() and eager
        (per, total), (per_nudged, total_nudged) = distance(eager, grads), distance(eager, nudged)
        assert total <= max(1e-3, 3 * total_nudged), (shape, total, total_nudged)
        apart = {n: (per[n], per_nudged[n]) for n in per if per[n] > max(1e-2, 3 * per_nudged[n])}
        assert not apart, (shape, apart)


def _module_outputs(model, run) -> list:
    """[(module name, output tensors)] in call order during run(), then ('result', run()'s tensors)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: seen.append((n, _tensors(out))))
             for n, m in model.named_modules() if n]
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    return seen + [("result", _tensors(result))]


def _tensors(out) -> list:
    return [t.detach().clone() for t in tensors_in(out)]


def _first_difference(a: list, b: list):
    """The first (module, max |difference|, dtypes) where two runs' outputs differ, or None."""
    for (name, xs), (name_b, ys) in zip(a, b):
        if name != name_b or len(xs) != len(ys):
            return (name, name_b, "different calls")
        for x, y in zip(xs, ys):
            if x.shape != y.shape or x.dtype != y.dtype:
                return (name, "shape/dtype", x.shape, y.shape, x.dtype, y.dtype)
            if not torch.equal(x, y) and not (x.is_floating_point() and torch.equal(x.nan_to_num(), y.nan_to_num())):
                return (name, (x.float() - y.float()).abs().max().item(), x.dtype)
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_distillation_terms_on_cuda_equal_cpu(family):
    torch.manual_seed(0)
    student = build_detector(small(family), 5).train()
    teacher = build_detector(small(family, "resnet34", hidden=64), 5)
    cfg = DistillConfig(method="detrdistill")
    terms = {}
    for device in ("cpu", CUDA):
        torch.manual_seed(1)  # the feature adapters' init
        loss_fn = DistillationLoss(teacher, SetCriterion(5), cfg, 64, 64, 2, 2, student.config.levels).to(device)
        student.to(device)
        # dropout is 0: train mode is deterministic, and the feature term sees train-mode features
        out = loss_fn(student, *batch(device))
        terms[str(device)] = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0}
    cpu, gpu = terms["cpu"], terms["cuda"]
    assert {"kd_logits", "kd_feature", "kd_query_prior"} <= set(cpu)
    for k in cpu:
        assert abs(gpu[k] - cpu[k]) <= 1e-3 * max(1.0, abs(cpu[k])), (k, cpu[k], gpu[k])


def test_teacher_run_ahead_on_cuda_gives_the_plain_losses():
    """The engine's CUDA default: the KD cost goes to the host without blocking, the teacher's forward on the
    next batch is queued, then the solve; and with overlap_teacher "thread", that forward issued by a helper
    thread on a stream of its own, under bf16 autocast as the engine runs it. Same losses as the plain order,
    step after step (the teacher's outputs cross from its stream to this one: a missing synchronisation would
    show as other values)."""
    from trainers.accel.teacher_ahead import RunAhead
    torch.manual_seed(0)
    teacher = build_detector(small("deformable_detr", "resnet34"), 5).to(CUDA)
    batches = [batch(CUDA, seed) for seed in range(4)]
    losses = {}
    for mode in ("plain", "ahead", "thread"):
        torch.manual_seed(0)
        student = build_detector(small("deformable_detr"), 5).to(CUDA).train()
        loss_fn = DistillationLoss(teacher, SetCriterion(5), DistillConfig(method="detrdistill"), 64, 64, 2, 2,
                                   student.config.levels).to(CUDA)
        loss_fn = loss_fn if mode == "plain" else RunAhead(loss_fn, thread=mode == "thread")
        losses[mode] = []
        for i, (images, mask, targets) in enumerate(batches):
            if mode != "plain":
                loss_fn.upcoming = batches[i + 1][:2] if i + 1 < len(batches) else None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = loss_fn(student, images, mask, targets)
            losses[mode].append({k: float(v) for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0})
    for mode in ("ahead", "thread"):
        for plain, other in zip(losses["plain"], losses[mode]):
            assert plain.keys() == other.keys()
            for k in plain:
                assert abs(plain[k] - other[k]) <= 1e-5 * max(1.0, abs(plain[k])), (mode, k, plain[k], other[k])


def _cuda_distill_trial(tiny_data_root, tmp_path, epochs: int):
    """A tiny Deformable DETR distillation trial on CUDA, its teacher trained first (one epoch), with a data
    worker (so that the engine runs the teacher ahead, its CUDA default)."""
    from trainers.config import TeacherConfig
    teacher = tiny_trial(tiny_data_root, "deformable_detr", epochs=1, device="cuda")
    run_trial(teacher, tmp_path / "teacher", log=lambda s: None)
    config = tiny_trial(tiny_data_root, "deformable_detr", epochs=epochs, device="cuda",
                        distill=DistillConfig(method="detrdistill"),
                        teacher=TeacherConfig(model=teacher.model, checkpoint=tmp_path / "teacher" / "checkpoint.pt"))
    return config.model_copy(update={"runtime": config.runtime.model_copy(update={"data_workers": 1})})


@pytest.mark.parametrize("family", FAMILIES)
def test_a_distillation_step_queues_its_forwards_and_losses_without_waiting_for_the_gpu(family):
    """CUDA's own check (torch.cuda.set_sync_debug_mode: a warning at every blocking copy, .item() and
    stream synchronisation) around a DETRDistill step as the engine runs it on CUDA (teacher output queued by
    the previous step, the next batch's teacher forward queued, bf16 autocast): the forwards and all loss
    terms are queued without the host once waiting for the GPU. The assignments are solved on the helper
    thread, which waits on CUDA events only (not flagged), and only for the copies it needs."""
    import warnings
    from trainers.accel.teacher_ahead import RunAhead
    torch.manual_seed(0)
    student = build_detector(small(family), 5).to(CUDA).train()
    teacher = build_detector(small(family, "resnet34"), 5).to(CUDA)
    loss_fn = RunAhead(DistillationLoss(teacher, SetCriterion(5), DistillConfig(method="detrdistill"), 64, 64, 2, 2,
                                        student.config.levels).to(CUDA))
    batches = [batch(CUDA, seed) for seed in range(3)]

    def step(i):
        images, mask, targets = batches[i]
        loss_fn.upcoming = batches[i + 1][:2]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss_fn(student, images, mask, targets)
    step(0)["loss"].backward()  # first use: lazily made state, the pinned-memory cache's blocks
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            losses = step(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]
    assert waits == [], "\n".join(waits)
    assert torch.isfinite(losses["loss"]) and {"kd_logits", "kd_feature", "kd_query_prior"} <= set(losses)


def test_a_distillation_trial_on_cuda_waits_for_the_gpu_only_at_its_log_lines(tiny_data_root, tmp_path,
                                                                               monkeypatch):
    """The engine's whole CUDA training loop as a distillation trial runs it (bf16 weight copies, the teacher
    run ahead with a data worker, the assignments on the helper thread, the loss's finiteness read a step
    late, fused AdamW, gradient clipping) under CUDA's sync check for its second epoch: the host waits for
    the GPU only where it reads the loss sums (for a log line, and the epoch's means), never inside a step."""
    import inspect
    import warnings
    import trainers.engine as engine
    from trainers.accel import readback
    config = _cuda_distill_trial(tiny_data_root, tmp_path, epochs=2)
    train_one_epoch, caught, logs = engine.train_one_epoch, [], []

    def checked(*args, **kwargs):
        if args[7] == 0:  # the first epoch: lazily made state, allocator and pinned-memory caches warm up
            return train_one_epoch(*args, **kwargs)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return train_one_epoch(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                caught.extend(w for w in got if "synchroniz" in str(w.message))
    monkeypatch.setattr(engine, "train_one_epoch", checked)
    run_trial(config, tmp_path / "student", log=logs.append)
    lines, start = inspect.getsourcelines(readback.LossSums.totals)
    reads = {start + i for i, line in enumerate(lines) if ".tolist()" in line}
    where = [f"{w.filename}:{w.lineno}" for w in caught]
    assert caught and all(w.filename == readback.__file__ and w.lineno in reads for w in caught), where
    assert len(caught) <= sum(1 for line in logs if "epoch 2/2 step" in line) + 1  # + the epoch's means


def test_trial_trains_evaluates_and_resumes_on_cuda_with_amp(tiny_data_root, tmp_path):
    config = tiny_trial(tiny_data_root, "deformable_detr", epochs=2, device="cuda")
    assert config.schedule.amp
    reports = []

    def stop_after_first(metrics, checkpoint):
        reports.append(metrics)
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_trial(config, tmp_path, report=stop_after_first, log=lambda s: None)
    final = run_trial(config, tmp_path, report=lambda m, c: reports.append(m), log=lambda s: None)
    assert [m["epoch"] for m in reports] == [1, 2]
    assert all(math.isfinite(m["train/loss"]) for m in reports)
    assert all(0.0 <= final[k] <= 1.0 for k in ("AP", "AP50"))


def test_distillation_trial_with_amp_on_cuda(tiny_data_root, tmp_path):
    """The engine's bf16 path for distillation: student and teacher on bf16 weight copies, the teacher run
    ahead (data workers on CUDA), every KD term reported and finite."""
    config = _cuda_distill_trial(tiny_data_root, tmp_path, epochs=1)
    assert config.schedule.amp
    reports = []
    run_trial(config, tmp_path / "student", report=lambda m, c: reports.append(m), log=lambda s: None)
    for key in ("train/kd_logits", "train/kd_feature", "train/kd_query_prior", "train/loss_det", "AP"):
        assert key in reports[-1] and math.isfinite(reports[-1][key]), key


def _assert_outputs_close(expected, got, tol, what):
    pairs = list(zip(tensors_in(expected), tensors_in(got), strict=True))
    for i, (a, b) in enumerate(pairs):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, i)
        if a.dtype == torch.bool:
            assert torch.equal(a, b), (what, i)
            continue
        err = (a.float() - b.float()).abs().max().item()
        assert err <= tol * max(1.0, a.float().abs().max().item()), (what, i, err)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graphed_teacher_replays_the_eager_forward(family, dtype):
    """runtime.teacher_cuda_graph: a shape's first call runs eagerly, its second captures, later ones replay;
    two shapes alternate (their graphs share one memory pool) and every output equals the eager teacher's on
    the same input (bf16: on bf16 weight copies under autocast, as the engine runs a teacher). An output kept
    from an earlier call is not overwritten by later replays (outputs leave the pool), and at most max_graphs
    graphs are kept."""
    from trainers.accel.bf16_weights import BF16Weights
    from trainers.accel.graphed_teacher import GraphedTeacher
    torch.manual_seed(0)
    teacher = build_detector(small(family, "resnet34"), 5).to(CUDA).eval()
    if dtype == "bf16":
        teacher = BF16Weights(teacher, frozen=True)
    graphed = GraphedTeacher(teacher, max_graphs=2)
    tol = 1e-5 if dtype == "fp32" else 1e-2
    inputs = {"a": [batch(CUDA, seed)[:2] for seed in range(4)],
              "b": [(im[:, :, :64, :96].contiguous(), m[:, :64, :96].contiguous())
                    for im, m in (batch(CUDA, seed)[:2] for seed in range(4, 7))]}
    order = ["a", "a", "a", "b", "b", "a", "b"]
    used = {"a": 0, "b": 0}
    kept = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        for shape in order:
            images, mask = inputs[shape][used[shape]]
            used[shape] += 1
            got = graphed(images, mask)
            expected = teacher(images, mask)
            _assert_outputs_close(expected, got, tol, (shape, used[shape]))
            kept.append((expected, got))
        assert len(graphed.graphs) == 2 and graphed.stopped is None
        for i, (expected, got) in enumerate(kept):  # still their own values after every later replay
            _assert_outputs_close(expected, got, tol, ("kept", i))
        images, mask = inputs["a"][0][0][:1], inputs["a"][0][1][:1]  # a third shape: the oldest graph goes
        graphed(images, mask)
        graphed(images, mask)
        assert len(graphed.graphs) == 2 and graphed.stopped is None


def test_graphed_teacher_in_a_distillation_step_gives_the_eager_losses_without_waiting():
    """The engine's CUDA distillation step (teacher run ahead, bf16 weight copies, bf16 autocast) with the
    teacher's forward replayed from a graph: the same losses as with the eager teacher, step after step (the
    capture happens inside a step, while the helper thread solves the step's assignments), and once captured
    a step queues everything without the host waiting for the GPU."""
    import warnings
    from trainers.accel.bf16_weights import BF16Weights
    from trainers.accel.graphed_teacher import GraphedTeacher
    from trainers.accel.teacher_ahead import RunAhead
    torch.manual_seed(0)
    teacher = BF16Weights(build_detector(small("deformable_detr", "resnet34"), 5).to(CUDA), frozen=True)
    batches = [batch(CUDA, seed) for seed in range(5)]
    losses = {}
    for mode in ("eager", "graph"):
        torch.manual_seed(0)
        student = build_detector(small("deformable_detr"), 5).to(CUDA).train()
        objective = DistillationLoss(GraphedTeacher(teacher) if mode == "graph" else teacher, SetCriterion(5),
                                     DistillConfig(method="detrdistill"), 64, 64, 2, 2, student.config.levels)
        loss_fn = RunAhead(objective.to(CUDA))
        losses[mode] = []
        for i, (images, mask, targets) in enumerate(batches[:-1]):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if mode == "graph" and i >= 2:  # captured in step 0's run-ahead (the shape's second call)
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    loss_fn.upcoming = batches[i + 1][:2]
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = loss_fn(student, images, mask, targets)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            waits = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]
            assert waits == [], (mode, i, "\n".join(waits))
            out["loss"].backward()
            losses[mode].append({k: float(v) for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0})
        if mode == "graph":
            assert len(objective.teacher.graphs) == 1 and objective.teacher.stopped is None
    for eager, graph in zip(losses["eager"], losses["graph"]):
        assert eager.keys() == graph.keys()
        for k in eager:
            assert abs(eager[k] - graph[k]) <= 1e-5 * max(1.0, abs(eager[k])), (k, eager[k], graph[k])


def _train_steps(forward_model, model, loss_fn, batches, amp: bool, check_sync_from=None, thread=False):
    """Steps as the engine runs them (autocast, backward, the weight copies' gradients to the master weights,
    clipping, an optimizer step) on the model's device -> the losses. batches: (images, mask, targets,
    upcoming); where any has an upcoming (images, mask), the objective's teacher runs ahead on it
    (accel.RunAhead; thread: on the helper thread). From step `check_sync_from` on, each step runs under
    CUDA's sync check and any wait for the GPU fails the test.

    SGD, not the engine's AdamW: Adam's first steps move a weight by about lr whatever the size of its gradient,
    so the rounding noise of a gradient that is zero in theory (an attention key's bias) would move two runs
    apart by lr wherever their kernels round differently (a graph's backward takes each output's gradient in
    the output's layout); SGD moves weights by lr times the gradient, differences included."""
    import warnings
    from trainers.accel.bf16_weights import BF16Weights
    from trainers.accel.teacher_ahead import RunAhead
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for p in getattr(loss_fn, "trainable", torch.nn.ModuleDict()).parameters()]
    ahead = any(upcoming is not None for *_, upcoming in batches)
    call = RunAhead(loss_fn, thread) if ahead else loss_fn
    device = params[0].device
    opt = torch.optim.SGD(params, lr=1e-2)
    losses = []
    for i, (images, mask, targets, upcoming) in enumerate(batches):
        checked = check_sync_from is not None and i >= check_sync_from
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if checked:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                if ahead:
                    call.upcoming = upcoming
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = call(forward_model, images, mask, targets)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                if isinstance(forward_model, BF16Weights):
                    forward_model.grads_to_master()
                torch.nn.utils.clip_grad_norm_(params, 0.1)
                opt.step()
            finally:
                if checked:
                    torch.cuda.set_sync_debug_mode("default")
        waits = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]
        assert waits == [], (i, "\n".join(waits))
        losses.append({k: v.item() for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0})
    return losses


def _assert_same_training(eager_losses, graphed_losses, eager_model, graphed_model, tol):
    for step, (a, b) in enumerate(zip(eager_losses, graphed_losses, strict=True)):
        assert a.keys() == b.keys()
        for k in a:
            assert abs(a[k] - b[k]) <= tol * max(1.0, abs(a[k])), (step, k, a[k], b[k])
    ea, gr = eager_model.state_dict(), graphed_model.state_dict()
    for k in ea:  # weights and batch norm statistics
        err = (ea[k].double() - gr[k].double()).abs().max().item() if ea[k].numel() else 0.0
        assert err <= tol * max(1.0, ea[k].double().abs().max().item()), (k, err)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graphed_training_steps_equal_eager_steps(family, dtype):
    """runtime.cuda_graph: the training forward and backward replayed from CUDA graphs (bf16: inside the bf16
    weight copies, as the engine runs them) train as the eager steps do: the same losses step after step and
    the same weights and batch norm statistics after six steps over two input shapes (each captured at its
    second step; dropout 0). The graphed steps after capture wait for nothing."""
    import copy
    from trainers.accel.bf16_weights import BF16Weights
    from trainers.accel.graphed_model import GraphedModel
    torch.manual_seed(0)
    eager = build_detector(small(family), 5).to(CUDA).train()
    graphed = copy.deepcopy(eager)
    a = [batch(CUDA, seed) for seed in range(4)]
    b = [(im[:, :, :64, :96].contiguous(), m[:, :64, :96].contiguous(), t) for im, m, t in
         (batch(CUDA, seed) for seed in range(4, 6))]
    batches = [(*x, None) for x in (a[0], a[1], a[2], b[0], b[1], a[3])]
    amp = dtype == "bf16"
    wrapper = GraphedModel(graphed)
    forwards = (BF16Weights(eager), BF16Weights(wrapper)) if amp else (eager, wrapper)
    eager_losses = _train_steps(forwards[0], eager, DetectionLoss(SetCriterion(5)), batches, amp)
    graphed_losses = _train_steps(forwards[1], graphed, DetectionLoss(SetCriterion(5)), batches, amp,
                                  check_sync_from=5)  # a's graph again, after b's capture
    assert wrapper.stopped is None and len(wrapper.graphs) == 2
    _assert_same_training(eager_losses, graphed_losses, eager, graphed, 1e-5 if dtype == "fp32" else 1e-3)


def test_graphed_distillation_steps_equal_eager_steps():
    """A DETRDistill step as the engine runs it on CUDA (teacher run ahead, bf16 weight copies) with
    runtime.cuda_graph and teacher_cuda_graph: the student's forward and backward and the teacher's forward
    replayed from graphs give the eager steps' losses and weights (the query-prior group goes through the
    student's graph as an input), and once captured a step waits for nothing."""
    import copy
    from trainers.accel.bf16_weights import BF16Weights
    from trainers.accel.graphed_teacher import GraphedTeacher
    from trainers.accel.graphed_model import GraphedModel
    torch.manual_seed(0)
    teacher = BF16Weights(build_detector(small("deformable_detr", "resnet34"), 5).to(CUDA), frozen=True)
    eager = build_detector(small("deformable_detr"), 5).to(CUDA).train()
    graphed = copy.deepcopy(eager)
    data = [batch(CUDA, seed) for seed in range(6)]
    batches = [(*data[i], data[i + 1][:2]) for i in range(5)]
    results = []
    for student, t in ((eager, teacher), (graphed, GraphedTeacher(teacher))):
        torch.manual_seed(1)  # the feature adapters' init
        loss_fn = DistillationLoss(t, SetCriterion(5), DistillConfig(method="detrdistill"), 64, 64, 2, 2,
                                   student.config.levels).to(CUDA)
        forward = BF16Weights(GraphedModel(student) if student is graphed else student)
        results.append(_train_steps(forward, student, loss_fn, batches, amp=True,
                                    check_sync_from=3 if student is graphed else None))
        if student is graphed:
            assert forward.model.stopped is None and len(forward.model.graphs) == 1
            assert t.stopped is None and len(t.graphs) == 1
    _assert_same_training(results[0], results[1], eager, graphed, 1e-3)


def count_captures(monkeypatch) -> dict:
    """{"student": captures of GraphedModel's step graphs, "teacher": of GraphedTeacher's}, counted from now on
    (the wrappers a trial makes itself included)."""
    import trainers.accel.graphed_model as graphed_model
    import trainers.accel.graphed_teacher as graphed_teacher
    captures = {"student": 0, "teacher": 0}
    for module, name, label in ((graphed_model, "_StepGraph", "student"), (graphed_teacher, "_Graph", "teacher")):
        class Counted(getattr(module, name)):
            def __init__(self, *args, _label=label):
                captures[_label] += 1
                super().__init__(*args)
        monkeypatch.setattr(module, name, Counted)
    return captures


def test_a_trial_with_cuda_graphs_trains_and_evaluates(tiny_data_root, tmp_path, monkeypatch):
    """runtime.cuda_graph and teacher_cuda_graph in a distillation trial on CUDA (one input shape: a single
    scale, no crop): both capture, nothing warns, and the trial ends with finite losses and AP."""
    import warnings
    captures = count_captures(monkeypatch)
    config = _cuda_distill_trial(tiny_data_root, tmp_path, epochs=1)
    augment = config.data.augment.model_copy(update={"scales": [96], "crop": False, "max_size": 200})
    config = config.model_copy(update={
        "data": config.data.model_copy(update={"augment": augment}),
        "runtime": config.runtime.model_copy(update={"cuda_graph": True, "teacher_cuda_graph": True})})
    reports = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without CUDA graphs")  # capturing stopped (cuda_graphs.py)
        run_trial(config, tmp_path / "student", report=lambda m, c: reports.append(m), log=lambda s: None)
    assert captures["student"] >= 1 and captures["teacher"] >= 1, captures
    for key in ("train/kd_logits", "train/kd_feature", "train/kd_query_prior", "train/loss_det", "AP"):
        assert key in reports[-1] and math.isfinite(reports[-1][key]), key

