"""Train-step time and peak memory: ours vs transformers' model of the same config, measured side by side.

    python benchmarks/step.py                 # tiny CPU config (every family), ratios only are meaningful
    python benchmarks/step.py --scale paper   # 800x1066, batch 2, resnet50, 300 queries (a GPU)
    python benchmarks/step.py --distill       # also: distillation step vs student step vs the floor
    python benchmarks/step.py --scale tiny6   # tiny images, the paper's 6 + 6 layers and 300 queries
    python benchmarks/step.py --scale paper --channels-last --ours-only   # NHWC backbones (bf16 on a GPU)
    python benchmarks/step.py --scale paper --compile --ours-only         # torch.compile'd detectors

Also counted, in one more step: the aten operators a step dispatches, views excluded ("ops"). On a GPU each
is about one kernel launch, and a step whose kernels are small costs its launches: the count is a
device-independent measure of that overhead, which the CPU can compare too (a launch-bound GPU step follows
it; the CPU's own time does not, being dominated by the convolutions). With --compile there is no count
(inductor's fused kernels are not aten operators) and "1st s", the first step, is mostly compilation.

One step = the engine's (trainers.engine.train_step, on the epoch machinery of trainers.accel.prepare): forward,
the set loss (ours: our criterion; transformers: its own loss), the deferred finiteness check, backward,
gradient clipping, fused AdamW step. Each configuration runs with the RuntimeConfig a trial would (`_runtime`).
dtypes: fp32; bf16 = autocast as the engine runs it (ours on bf16 copies of its Linear/Conv2d weights, the
teacher too: trainers/accel/bf16_weights.py; transformers' model, and ours with --compile, with autocast alone;
with --compile the distillation teacher is compiled too, as runtime.compile does);
bf16-plain = autocast alone; -nhwc: channels_last backbone and images (as --channels-last, but per configuration,
so that one interleaved comparison holds both layouts); bf16-cudnn-sdp = bf16 with cuDNN's attention kernels,
PyTorch's default, which the engine turns off (trainers/accel/kernels.py: select_attention_kernels); bf16-ln =
bf16 with LayerNorm returning bf16 (a bf16 residual stream: the engine's schedule.amp_layer_norm bfloat16);
fp32-graph, bf16-graph, bf16-ln-graph = those with the student's training forward and backward (and a
distillation teacher's forward) replayed from CUDA graphs (runtime.cuda_graph, teacher_cuda_graph; captured in
the warm-up steps; their "ops" are what the host still dispatches: losses, matching, optimizer).
Reported: the median over --steps timed steps after --warmup steps. The configurations compared in one table row
(a family's ours and transformers' in fp32 and bf16; the parts of a distillation step) are built together and
timed interleaved, one step of each per round, so that the machine's drift between them (GPU clocks, other
tenants) does not enter their ratios. On CUDA that is in this process, and peak memory is
torch.cuda.max_memory_allocated during a configuration's warm-up less what the configurations built before it
hold; on the CPU each configuration runs in a subprocess of its own (peak memory: its peak RSS; its times are not
compared), unless --in-process.

The distillation floor is what a distillation step cannot avoid, each part measured on its own: the student
step, the teacher's forward (eval, no grad), and the extra cost of passing the teacher's queries through the
student's decoder as an extra group (a query-prior-only step with the teacher's output cached, minus the
student step). distill/floor - 1 is the overhead of the KD terms themselves (matching, feature masks, losses).
"kd solve" is the CPU time of the logits-KD assignment solve within the distillation step (median); "alone" the
same step's problems solved again with nothing else running, "serial" so on one thread; of the
"ahead" step, "landed" is the time from the KD term's start until its cost is on the host (how far the GPU
lags this thread) and "waited" the time this thread then blocked for the assignment (what was not hidden);
"t.wait" is "waited" of the "thread" step; "gt.wait" the time the "ahead" step blocked collecting its two
assignments to the ground truth (started on the helper thread too: on a GPU, ~0 if nothing waits).
"ahead" is the same DETRDistill step with the teacher's forward on the next batch queued right after the KD
assignment is started (the engine's default on CUDA): on a GPU the assignment is solved on a helper thread
while this one queues the teacher and the other terms, and the GPU runs them meanwhile. On the CPU both run on
the same cores (and the solve stays in line), so only a GPU shows the difference. "thread" is "ahead" with the
teacher's forward issued by a helper thread on a CUDA stream of its own, from the start of the step
(overlap_teacher "thread", trainers/accel/teacher_ahead.py): the two forwards' host work shares the host's time.
With --teacher-graph, "graphed" rows: the teacher's forward replayed from a CUDA graph (runtime.
teacher_cuda_graph), timed alone and in the "ahead" step, and the floor with that forward.
Frozen batch norm statistics are set from each model's own input on the benchmark batch
(`_calibrate_frozen_bn`), as a pretrained backbone's are about: under the identity statistics of random
weights a ResNet-101 overflows and the teacher's predictions turn NaN.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

FAMILIES = ["conditional_detr", "deformable_detr", "adamixer"]
HF_FAMILIES = {"conditional_detr", "deformable_detr"}
SCALES = {
    "tiny": dict(height=128, width=160, batch=2, backbone="resnet18", queries=50, hidden=128, enc=2, dec=2,
                 classes=10, teacher_backbone="resnet50"),
    # the paper's depths and query count at a tiny size: the CPU can count (and time) a deep step's operators
    "tiny6": dict(height=128, width=160, batch=2, backbone="resnet18", queries=300, hidden=128, enc=6, dec=6,
                  classes=10, teacher_backbone="resnet50", norm="frozen_bn"),
    "paper": dict(height=800, width=1066, batch=2, backbone="resnet50", queries=300, hidden=256, enc=6, dec=6,
                  classes=91, teacher_backbone="resnet101", norm="frozen_bn"),
    # paper scale at batch 8: four times the GPU work for the same launches (is a batch-2 step's bf16 held back
    # by its host, which issues the same launches in either dtype?)
    "paper_b8": dict(height=800, width=1066, batch=8, backbone="resnet50", queries=300, hidden=256, enc=6, dec=6,
                     classes=91, teacher_backbone="resnet101", norm="frozen_bn"),
}
# bf16: autocast with the weights as bf16 copies (BF16Weights, as the engine runs it); bf16-plain: autocast only
# -nhwc: channels_last backbone and images; -cudnn-sdp: the engine's bf16 but with cuDNN's attention kernels
# (PyTorch's default, which the engine turns off: trainers/accel/kernels.py select_attention_kernels)
# -ln (the engine's schedule.amp_layer_norm bfloat16): LayerNorm returns bf16 under autocast (computing in float32
# inside), so the residual stream is bf16, as Megatron-LM keeps it by default, and the fp32 LayerNorm outputs
# are not cast again before each bf16 matrix product (~2 casts and their backward a LayerNorm)
# -graph (runtime.cuda_graph and teacher_cuda_graph): the student's training forward and backward, and a
# distillation teacher's forward, replayed from CUDA graphs (trainers/accel/graphed_model.py, graphed_teacher.py)
DTYPES = ("fp32", "bf16", "bf16-plain", "bf16-nhwc", "fp32-nhwc", "bf16-cudnn-sdp", "bf16-ln", "fp32-graph",
          "bf16-graph", "bf16-ln-graph")
COPIES = ("bf16", "bf16-nhwc", "bf16-cudnn-sdp", "bf16-ln", "bf16-graph", "bf16-ln-graph")  # bf16 weight copies
# what one measurement builds: ours/transformers train steps, and the parts of a distillation step
MODES = ("student", "transformers", "teacher_forward", "student_group", "distill", "distill_ahead", "distill_thread",
         "teacher_graph", "distill_graph")
GRAPHED = ("teacher_graph", "distill_graph")  # the teacher's forward replayed from a CUDA graph (--teacher-graph)


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _targets(scale, device):
    import torch
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(scale["batch"]):
        n = 5
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, scale["classes"], (n,), generator=g).to(device),
                    "boxes": torch.cat([cxcy, wh], 1).to(device),
                    "size": torch.tensor([scale["height"], scale["width"]], device=device)})
    return out


def _inputs(scale, device):
    import torch
    images = torch.randn(scale["batch"], 3, scale["height"], scale["width"], device=device)
    mask = torch.zeros(scale["batch"], scale["height"], scale["width"], dtype=torch.bool, device=device)
    return images, mask, _targets(scale, device)


def _model_config(family, scale, backbone):
    from trainers.config import ModelConfig
    kw = dict(family=family, backbone=backbone, decoder_layers=scale["dec"], num_queries=scale["queries"],
              hidden_dim=scale["hidden"], backbone_norm=scale.get("norm", "auto"))
    if family != "adamixer":
        kw["encoder_layers"] = scale["enc"]
    return ModelConfig(**kw)


def _calibrate_frozen_bn(model, images):
    """Sets every frozen batch norm's statistics to those of its input on `images`, layer after layer, as a
    pretrained backbone's are about. Random weights under the identity statistics of a fresh frozen batch
    norm leave a deep ResNet unnormalised: a ResNet-101's C5 grows by orders of magnitude, its Conditional
    DETR's boxes degenerate and the KD cost turns NaN, and a step times overflowing values."""
    import torch
    from trainers.models.backbone import FrozenBatchNorm2d

    def calibrate(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))
        module.refresh()
    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        with torch.no_grad():
            model.backbone(images, torch.zeros_like(images[:, 0], dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    return model


class _CachedTeacher:
    """Stands in for the teacher with one precomputed output: the step then pays no teacher forward."""

    def __init__(self, teacher, images, mask):
        import torch
        with torch.no_grad():
            self.out = teacher(images, mask)

    def eval(self):
        return self

    def requires_grad_(self, flag):
        return self

    def to(self, device):
        return self

    def __call__(self, images, mask):
        return self.out


def _runtime(dtype, mode, compiled=False):
    """The RuntimeConfig a trial runs one configuration with: compile, the -graph dtypes' CUDA graphs (the
    teacher's also in the GRAPHED modes), the teacher run ahead in the ahead and thread modes."""
    from trainers.config import RuntimeConfig
    graphs = dtype.endswith("-graph") and not compiled
    overlap = {"distill_ahead": "on", "distill_graph": "on", "distill_thread": "thread"}.get(mode, "off")
    return RuntimeConfig(compile=compiled, cuda_graph=graphs, teacher_cuda_graph=graphs or mode in GRAPHED,
                         overlap_teacher=overlap)


def _train_step(loss_fn, model, params, batch, runtime, dtype, copies=False, compiled_model=None):
    """The engine's training step (trainers.engine.train_step, on its epoch's accel.prepare with `runtime`) on
    the same batch every call: with overlap_teacher on, the teacher's forward queued for the next step is the
    one that step uses. copies and dtype bf16: the model runs on bf16 copies of its weights (BF16Weights), as
    the engine runs ours; compiled_model: the model through accel.compile_model."""
    import itertools
    import torch
    from trainers import accel
    from trainers.config import ScheduleConfig
    from trainers.engine import NonFiniteLossError, train_step
    device = batch[0].device
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as the engine (and for transformers' model too)
    run = accel.prepare(model, loss_fn, opt, runtime, device, copies and dtype in COPIES, compiled_model,
                        error=NonFiniteLossError)
    batches = run.batches(itertools.repeat(batch))
    schedule = ScheduleConfig()  # its gradient clipping

    def step():
        train_step(run, *next(batches), opt, schedule, dtype.startswith("bf16"), "benchmark step")
    return step


def _ours(family, scale, device, dtype, mode, channels_last=False, compiled=False):
    """One configuration's step (or teacher forward), with the attention kernels the engine selects (or, for
    -cudnn-sdp, PyTorch's default) set at each call: configurations timed interleaved may differ in it."""
    from trainers import accel
    run = _build_ours(family, scale, device, dtype, mode, channels_last, compiled)

    def step():
        accel.select_attention_kernels(device, cudnn=dtype.endswith("-cudnn-sdp"))
        run()
    return step


def _build_ours(family, scale, device, dtype, mode, channels_last=False, compiled=False):
    """Student, teacher and objective as a trial builds them, the model and teacher wrapped by trainers.accel as
    its RuntimeConfig (`_runtime`) says."""
    import torch
    from trainers import accel
    from trainers.config import DistillConfig
    from trainers.criterion import SetCriterion
    from trainers.distill.objective import DistillationLoss
    from trainers.engine import DetectionLoss
    from trainers.models import build_detector
    from trainers.models.transformer_layers import set_bf16_layer_norm
    images, mask, targets = _inputs(scale, device)
    amp = dtype.startswith("bf16")
    runtime = _runtime(dtype, mode, compiled)
    model = build_detector(_model_config(family, scale, scale["backbone"]), scale["classes"]).to(device).train()
    _calibrate_frozen_bn(model, images)
    set_bf16_layer_norm(model, "-ln" in dtype)  # as the engine with amp_layer_norm bfloat16
    channels_last = channels_last or dtype.endswith("-nhwc")
    if channels_last:  # NHWC images and backbone weights: cuDNN's tensor-core convolutions want this in bf16
        images = images.contiguous(memory_format=torch.channels_last)
        model.backbone.to(memory_format=torch.channels_last)
    # compiled: the whole detector one graph (no graph breaks in any family); matching and losses stay eager.
    # bf16 runs plain autocast then: swapping weight copies in would break the graph's guards, and the compiler
    # fuses autocast's casts into its kernels anyway
    compiled_model = accel.compile_model(model) if compiled else None
    criterion = SetCriterion(scale["classes"])
    batch = (images, mask, targets)
    if mode == "student":
        params = [p for p in model.parameters() if p.requires_grad]
        return _train_step(DetectionLoss(criterion), model, params, batch, runtime, dtype, copies=True,
                           compiled_model=compiled_model)
    teacher = _calibrate_frozen_bn(build_detector(_model_config(family, scale, scale["teacher_backbone"]),
                                                  scale["classes"]).to(device), images)
    set_bf16_layer_norm(teacher, "-ln" in dtype)
    if channels_last:
        teacher.backbone.to(memory_format=torch.channels_last)
    if mode != "student_group" or not compiled:  # the extra-group measurement caches one teacher output:
        # nothing to compile there; the GRAPHED modes' and -graph dtypes' warm-up steps capture
        teacher = accel.wrap_teacher(teacher, runtime, amp=dtype in COPIES)
    if mode in ("teacher_forward", "teacher_graph"):
        teacher.eval()

        def forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                teacher(images, mask)
        return forward
    if mode == "student_group":  # the extra query group alone: query prior on, teacher output cached
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            teacher = _CachedTeacher(teacher.eval(), images, mask)
        cfg = DistillConfig(method="detrdistill", logits={"weight": 0}, feature={"weight": 0}, contrastive={"weight": 0})
    else:  # the full DETRDistill step: every term at its default weight
        cfg = DistillConfig(method="detrdistill")
    loss_fn = DistillationLoss(teacher, criterion, cfg, scale["hidden"], scale["hidden"], scale["dec"],
                               scale["dec"], model.config.levels).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(loss_fn.trainable.parameters())
    return _train_step(loss_fn, model, params, batch, runtime, dtype, copies=True, compiled_model=compiled_model)


def _hf(family, scale, device, dtype):
    import torch
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, DeformableDetrConfig, \
        DeformableDetrForObjectDetection
    from trainers import accel
    from trainers.config import RuntimeConfig
    from trainers.models.hf_backbone import hf_resnet_config
    levels = 1 if family == "conditional_detr" else 4
    out_features = ["stage4"] if levels == 1 else ["stage2", "stage3", "stage4"]
    common = dict(backbone_config=hf_resnet_config(scale["backbone"], out_features=out_features),
                  encoder_layers=scale["enc"], decoder_layers=scale["dec"], num_queries=scale["queries"],
                  d_model=scale["hidden"], num_labels=scale["classes"], auxiliary_loss=True)
    if family == "conditional_detr":
        model = ConditionalDetrForObjectDetection(ConditionalDetrConfig(**common))
    else:
        model = DeformableDetrForObjectDetection(DeformableDetrConfig(**common, num_feature_levels=levels))
    model = model.to(device).train()
    batch = _inputs(scale, device)
    pixel_mask = torch.ones(scale["batch"], scale["height"], scale["width"], dtype=torch.long, device=device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in batch[2]]

    def hf_loss(model, images, mask, targets):  # its own loss, on its own labels
        return {"loss": model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss}
    params = [p for p in model.parameters() if p.requires_grad]
    run = _train_step(hf_loss, model, params, batch, RuntimeConfig(), dtype)

    def step():  # transformers' model as PyTorch runs it by default: cuDNN's attention allowed
        accel.select_attention_kernels(device, cudnn=True)
        run()
    return step


_NOT_LAUNCHES = {"_unsafe_view", "lift_fresh", "lift_fresh_copy",  # metadata or host-side, not a kernel
                 "is_pinned", "_pin_memory"}


def count_ops(step) -> int:
    """aten operators one call of `step` dispatches (its backward included), view operators excluded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in _NOT_LAUNCHES:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def measure_group(configs, scale_name, steps, warmup, channels_last=False, compiled=False) -> list[dict]:
    """Build every configuration of a comparison ([(family, mode, dtype)]), then time them interleaved: round r
    runs one step of each, in an order rotated by r, so that a drift of the machine (GPU clocks, the host's
    load, other tenants) weighs on all of them alike and their ratios stay fair. Returns one dict per
    configuration: {median_s, peak_mib, device, ops, kd_{solve,landed,waited,alone,serial}_s, first_s}, or {error}; one that fails is
    dropped from the later rounds without losing the others' numbers."""
    import resource
    import torch
    if compiled:  # every configuration of a group compiles its own models: none may fall back to eager
        torch._dynamo.config.recompile_limit = 64
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = SCALES[scale_name]
    kd_times = _time_kd_solve()  # the KD assignment's solve, landing and wait, this step
    results, steppers = [{} for _ in configs], {}
    for i, (family, mode, dtype) in enumerate(configs):
        torch.manual_seed(0)
        _sync(device)
        held = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # the configurations built before
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            step = _hf(family, scale, device, dtype) if mode == "transformers" else \
                _ours(family, scale, device, dtype, mode, channels_last, compiled)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                for w in range(warmup):
                    t0 = time.perf_counter()
                    step()
                    _sync(device)
                    if w == 0:
                        results[i]["first_s"] = time.perf_counter() - t0  # with --compile: the compilation
                # a compiled model's kernels are not aten operators: no count
                results[i]["ops"] = -1 if compiled else count_ops(step)
                _sync(device)
            # a CUDA-graph wrapper that stopped capturing (a failed capture, e.g. out of memory) runs eagerly:
            # said beside the numbers, which are then not the graphs' (cuda_graphs.ShapeGraphs._stop)
            stopped = [str(w.message) for w in caught if "without CUDA graphs" in str(w.message)]
            if stopped:
                results[i]["graphs_stopped"] = stopped[0][:300]
                print(f"{family} {mode} {dtype}: {stopped[0][:300]}", file=sys.stderr, flush=True)
        except Exception as e:  # this configuration failed (e.g. out of memory): keep the others
            results[i] = {"error": f"{type(e).__name__}: {e}"[:200]}
            step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results[i]["peak_mib"] = (torch.cuda.max_memory_allocated() - held) / 2**20 if device.type == "cuda" \
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        steppers[i] = step
    times, kd, problems = {i: [] for i in steppers}, {i: [] for i in steppers}, {}
    for r in range(steps):
        order = list(steppers)
        order = order[r % len(order):] + order[:r % len(order)] if order else order
        for i in order:
            try:
                _sync(device)
                kd_times.update(dict.fromkeys(KD_TIMES, 0.0))
                t0 = time.perf_counter()
                steppers[i]()
                _sync(device)
            except Exception as e:
                results[i] = {"error": f"{type(e).__name__}: {e}"[:200]}
                del steppers[i]
                continue
            times[i].append(time.perf_counter() - t0)
            kd[i].append(dict(kd_times))
            if "problems" in SOLVED:  # this step's KD problems, for `_solve_alone` (outside the timed rounds)
                problems[i] = SOLVED.pop("problems")
    for i in steppers:
        results[i].update(median_s=statistics.median(times[i]),
                          **{f"kd_{k}_s": statistics.median(t[k] for t in kd[i]) for k in KD_TIMES},
                          device=str(device))
        if i in problems:
            results[i].update({f"kd_{k}_s": v for k, v in _solve_alone(problems[i]).items()})
    steppers.clear()
    return results


KD_TIMES = ("solve", "landed", "waited", "gt_waited")
SOLVED = {}  # "problems": the cost matrices of the last KD solve (to solve them again, alone)


def _solve_alone(problems) -> dict:
    """The step's KD problems solved again with nothing else running: {"alone": with the step's threads,
    "serial": on one thread} (medians of 3). "kd solve" well above "alone" means the step's other work
    (its host threads, the GIL) slowed the solve; "alone" near "serial", that it found no parallelism."""
    from trainers.matching import solve_assignments

    def timed(**kw):
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            solve_assignments(problems, **kw)
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)
    return {"alone": timed(), "serial": timed(num_threads=1)}


def _time_kd_solve() -> dict:
    """Wrap the logits-KD term's assignment: -> {name: seconds this step}, reset by the caller. "solve": in the
    solver; "landed": from the term's start until its cost is on the host (the GPU's lag behind this thread);
    "waited": this thread blocked in the term's finish() for the assignment (what run-ahead did not hide);
    "gt_waited": blocked collecting the assignments to the ground truth (student's and teacher's)."""
    from trainers.distill import logits
    # the unwrapped functions, also when an earlier measurement in this process wrapped them already
    solve = getattr(logits, "_untimed_solve_assignments", logits.solve_assignments)
    start = getattr(logits, "_untimed_start_on_host", logits.start_on_host)
    logits._untimed_solve_assignments, logits._untimed_start_on_host = solve, start
    times = dict.fromkeys(KD_TIMES, 0.0)

    def timed_solve(problems):
        t0 = time.perf_counter()
        try:
            return solve(problems)
        finally:
            times["solve"] += time.perf_counter() - t0
            SOLVED["problems"] = problems

    def timed_start(job, *tensors):
        t0 = time.perf_counter()

        def landed(*host):  # runs once the host copies are complete (helper thread, or in line in wait())
            times["landed"] += time.perf_counter() - t0
            return job(*host)
        return _timed_wait(start(landed, *tensors), times, "waited")
    logits.solve_assignments, logits.start_on_host = timed_solve, timed_start
    # the ground-truth assignments (the student's, the teacher's for the query prior): how long this thread
    # blocked collecting them
    from trainers import matching
    gt_start = getattr(matching, "_untimed_start_on_host", matching.start_on_host)
    matching._untimed_start_on_host = gt_start
    matching.start_on_host = lambda job, *tensors: _timed_wait(gt_start(job, *tensors), times, "gt_waited")
    return times


def _timed_wait(wait, times: dict, key: str):
    """`wait` that adds the time the caller blocked in it to times[key]."""
    def timed():
        t0 = time.perf_counter()
        try:
            return wait()
        finally:
            times[key] += time.perf_counter() - t0
    return timed


def run_group(configs, scale, steps, warmup, in_process, channels_last=False, compiled=False,
              threads=None) -> list[dict]:
    """A comparison's configurations timed interleaved in this process (CUDA, or --in-process), or on the
    CPU each in a subprocess of its own (peak RSS is per process; CPU times are not compared anyway)."""
    if in_process:
        import torch
        try:
            return measure_group(configs, scale, steps, warmup, channels_last, compiled)
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    out = []
    for family, mode, dtype in configs:
        cmd = [sys.executable, __file__, "--child", family, mode, "--scale", scale, "--dtypes", dtype,
               "--steps", str(steps), "--warmup", str(warmup)] + (["--channels-last"] if channels_last else []) + \
            (["--compile"] if compiled else []) + (["--threads", str(threads)] if threads else []) + \
            (["--switch-interval", str(sys.getswitchinterval())] if sys.getswitchinterval() != 0.005 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            out.append({"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
        else:
            out.append(json.loads(lines[-1]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=SCALES, default="tiny")
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    ap.add_argument("--dtypes", nargs="+", default=None, choices=DTYPES,
                    help="default: fp32 and bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--distill-dtypes", nargs="+", default=None, choices=DTYPES,
                    help="dtypes of the distillation table (default: as --dtypes)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--distill", action="store_true", help="also measure distillation step vs floor")
    ap.add_argument("--distill-only", action="store_true", help="only the distillation table")
    ap.add_argument("--json", help="also write every measurement to this file")
    ap.add_argument("--in-process", action="store_true", help="measure in this process on the CPU too")
    ap.add_argument("--channels-last", action="store_true",
                    help="our models' backbones and images in channels_last (NHWC) memory format")
    ap.add_argument("--ours-only", action="store_true", help="step table without transformers' models")
    ap.add_argument("--compile", action="store_true",
                    help="our models through torch.compile (the first step, compiling, is reported apart)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (torch.set_num_threads), which the KD solve also uses, as a trial's "
                         "cpus_per_trial sets them; default: torch's (OMP_NUM_THREADS, else the cores)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="the interpreter's thread switch interval in seconds (sys.setswitchinterval; Python's "
                         "default 0.005): how long a thread waiting for the GIL, the KD solver's, may wait while "
                         "the step's thread keeps taking it back between operators (benchmarks/gil_threads.py --solve)")
    ap.add_argument("--teacher-graph", action="store_true",
                    help="distillation table: also the teacher's forward replayed from a CUDA graph "
                         "(runtime.teacher_cuda_graph), alone and in the step run ahead")
    ap.add_argument("--child", nargs=2, metavar=("FAMILY", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.child:
        family, mode = args.child
        print(json.dumps(measure_group([(family, mode, args.dtypes[0])], args.scale, args.steps, args.warmup,
                                       args.channels_last, args.compile)[0]), flush=True)
        return
    import torch
    cuda = torch.cuda.is_available()
    dtypes = args.dtypes or (["fp32", "bf16"] if cuda else ["fp32"])
    results = []

    def run(configs):
        """Measure [(family, mode, dtype)] together -> {(mode, dtype): result}."""
        rs = run_group(configs, args.scale, args.steps, args.warmup, in_process=cuda or args.in_process,
                       channels_last=args.channels_last, compiled=args.compile, threads=args.threads)
        results.extend({"family": f, "mode": m, "dtype": d, **r} for (f, m, d), r in zip(configs, rs))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"scale": args.scale, "results": results}, f, indent=1)
        return {(m, d): r for (_, m, d), r in zip(configs, rs)}

    device = torch.cuda.get_device_name() if cuda else "cpu"
    layout = (" memory_format=channels_last" if args.channels_last else "") + (" torch.compile" if args.compile else "")
    threads = f"threads={torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, " \
              f"{len(os.sched_getaffinity(0))} CPUs)"
    print(f"scale={args.scale} {SCALES[args.scale]} device={device} torch={torch.__version__}{layout} {threads}"
          f" switch_interval={sys.getswitchinterval()}", flush=True)
    if not args.distill_only:
        step_table(args, dtypes, run)
    if args.distill or args.distill_only:
        distill_table(args, dtypes, run)


def step_table(args, dtypes, run):
    """Per family, ours and transformers' model in every dtype, timed interleaved; then ours bf16 / fp32."""
    print(f"{'family':18} {'dtype':10} {'ours s/step':>12} {'hf s/step':>10} {'ours/hf':>8} {'ours MiB':>9} "
          f"{'hf MiB':>8} {'ours ops':>9} {'hf ops':>8} {'ours 1st s':>10}", flush=True)
    for family in args.families:
        modes = ["student"] + (["transformers"] if family in HF_FAMILIES and not args.ours_only else [])
        r = run([(family, mode, dtype) for dtype in dtypes for mode in modes])
        for dtype in dtypes:
            ours, hf = r[("student", dtype)], r.get(("transformers", dtype), {})
            if "error" in ours:
                print(f"{family:18} {dtype:10} ours failed: {ours['error']}", flush=True)
                continue
            ratio = f"{ours['median_s'] / hf['median_s']:.2f}" if "median_s" in hf else "-"
            hf_s = f"{hf['median_s']:.4f}" if "median_s" in hf else ("failed" if "error" in hf else "-")
            hf_m = f"{hf['peak_mib']:.0f}" if "peak_mib" in hf else "-"
            hf_ops = str(hf["ops"]) if "ops" in hf else "-"
            ours_ops = str(ours["ops"]) if ours["ops"] >= 0 else "-"  # compiled: no operator count
            print(f"{family:18} {dtype:10} {ours['median_s']:12.4f} {hf_s:>10} {ratio:>8} {ours['peak_mib']:9.0f} "
                  f"{hf_m:>8} {ours_ops:>9} {hf_ops:>8} {ours.get('first_s') or 0:10.1f}", flush=True)
            if "error" in hf:
                print(f"  transformers failed: {hf['error']}", flush=True)
        fp32 = r.get(("student", "fp32"), {})
        for dtype in DTYPES[1:]:
            low = r.get(("student", dtype), {})
            if "median_s" in fp32 and "median_s" in low:
                print(f"{family:18} ours {dtype}/fp32 {low['median_s'] / fp32['median_s']:.3f} (below 1: faster "
                      f"than fp32)", flush=True)
        fp32 = r.get(("student", "fp32-graph"), {})
        for dtype in ("bf16-graph", "bf16-ln-graph"):
            low = r.get(("student", dtype), {})
            if "median_s" in fp32 and "median_s" in low:
                print(f"{family:18} ours {dtype}/fp32-graph {low['median_s'] / fp32['median_s']:.3f} (both "
                      f"replayed from CUDA graphs)", flush=True)


def distill_table(args, dtypes, run):
    print(f"\ndistillation step (DETRDistill, all terms; teacher {SCALES[args.scale]['teacher_backbone']}) vs the "
          f"floor = student step + teacher forward + extra query group", flush=True)
    print("(ahead: the teacher's forward on the next batch queued while the KD assignment is solved on a helper "
          "thread, as the engine does on CUDA)", flush=True)
    print("(thread: as ahead, the teacher's forward issued by a helper thread on a stream of its own, beside the "
          "step: overlap_teacher \"thread\")", flush=True)
    print(f"{'family':18} {'dtype':10} {'student':>8} {'t.fwd':>8} {'group':>8} {'floor':>8} {'distill':>8} "
          f"{'ahead':>8} {'thread':>8} {'distill/student':>15} {'distill/floor':>13} {'ahead/floor':>11} "
          f"{'thread/floor':>12} {'kd solve':>8} {'alone':>7} {'serial':>7} {'landed':>7} {'waited':>7} {'t.wait':>7} {'gt.wait':>7} {'ops: distill':>12} {'floor':>6} "
          f"{'d/floor':>7}", flush=True)
    parts = ("student", "teacher_forward", "student_group", "distill", "distill_ahead", "distill_thread")
    for family in args.families:
        for dtype in args.distill_dtypes or dtypes:
            # a -graph dtype's teacher is graphed in every mode already
            graphed = GRAPHED if args.teacher_graph and not dtype.endswith("-graph") else ()
            r = {m: v for (m, _), v in run([(family, m, dtype) for m in parts + graphed]).items()}
            if any("error" in r[m] for m in parts):
                print(f"{family:18} {dtype:10} failed: {[r[m].get('error') for m in parts]}", flush=True)
                continue
            s, t, g, d, a, th = (r[m]["median_s"] for m in parts)
            floor = g + t  # student step with the extra group (= student + group) + teacher forward
            ops = {m: r[m]["ops"] for m in r}
            ops_floor = ops["student_group"] + ops["teacher_forward"]
            counted = (f"{ops['distill']:12d} {ops_floor:6d} {ops['distill'] / ops_floor:7.2f}" if ops_floor > 0
                       else f"{'-':>12} {'-':>6} {'-':>7}")  # compiled: no operator count
            print(f"{family:18} {dtype:10} {s:8.4f} {t:8.4f} {g - s:8.4f} {floor:8.4f} {d:8.4f} {a:8.4f} {th:8.4f} "
                  f"{d / s:15.2f} {d / floor:13.2f} {a / floor:11.2f} {th / floor:12.2f} "
                  f"{r['distill']['kd_solve_s']:8.4f} {r['distill'].get('kd_alone_s', 0):7.4f} "
                  f"{r['distill'].get('kd_serial_s', 0):7.4f} "
                  f"{r['distill_ahead']['kd_landed_s']:7.4f} {r['distill_ahead']['kd_waited_s']:7.4f} "
                  f"{r['distill_thread']['kd_waited_s']:7.4f} {r['distill_ahead']['kd_gt_waited_s']:7.4f} "
                  f"{counted}", flush=True)
            if any("error" in r[m] for m in graphed):
                print(f"{'':18} {'  graphed':10} failed: {[r[m].get('error') for m in graphed]}", flush=True)
            elif graphed:  # the floor with the graphed teacher's forward, whose host work is one launch
                tg, dg = r["teacher_graph"]["median_s"], r["distill_graph"]["median_s"]
                print(f"{'':18} {'  graphed':10} teacher forward {tg:.4f} (eager {t:.4f}), floor {g + tg:.4f}, "
                      f"DETRDistill ahead {dg:.4f} (eager teacher {a:.4f}, {dg / a:.2f}x): ahead/floor "
                      f"{dg / (g + tg):.2f}, ahead/eager floor {dg / floor:.2f}; waited "
                      f"{r['distill_graph']['kd_waited_s']:.4f}", flush=True)


if __name__ == "__main__":
    main()
