"""One trial: build data and model, train with AdamW, evaluate with COCO mAP, checkpoint every epoch, resume.

`run_trial(config, workdir, report)` is the whole interface. It knows nothing of Ray or MLflow: whoever runs
it (a test, a Ray worker) receives each epoch's metrics and checkpoint through `report(metrics, checkpoint)`.

Exact resume: every epoch starts by seeding all RNGs from (seed, epoch), so what an epoch draws (sampling
order, augmentation, dropout) does not depend on whether the run was interrupted before it. Together with
the model, optimizer and scheduler state this makes a resumed CPU run bitwise equal to an uninterrupted one.
The last epoch's checkpoint keeps the weights, config and history only (a third of the size for AdamW).
"""
from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from trainers.bf16_weights import BF16Weights
from trainers.checkpoint import load_checkpoint, rng_state, save_checkpoint
from trainers.config import ScheduleConfig, TrialConfig
from trainers.criterion import SetCriterion, float32_losses
from trainers.data.batching import collate
from trainers.data.coco import build_dataset
from trainers.evaluate import evaluate
from trainers.graphed_model import GraphedModel
from trainers.matching import NonFiniteCostError
from trainers.models import build_detector
from trainers.models.constants import host_copies
from trainers.models.transformer_layers import set_bf16_layer_norm

Report = Callable[[dict, Optional[Path]], None]
CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial cannot continue."""


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def param_groups(model: torch.nn.Module, schedule: ScheduleConfig) -> list[dict]:
    """AdamW groups: the backbone at lr x lr_backbone_mult; deformable sampling offsets and reference points
    at lr x lr_linear_proj_mult (Deformable DETR's recipe); everything else at lr. Frozen params are left out."""
    groups = {"backbone": [], "linear_proj": [], "default": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(p)
        else:
            groups["default"].append(p)
    mult = {"backbone": schedule.lr_backbone_mult, "linear_proj": schedule.lr_linear_proj_mult, "default": 1.0}
    return [{"params": ps, "lr": schedule.lr * mult[k], "name": k} for k, ps in groups.items() if ps]


def lr_factor(schedule: ScheduleConfig, iters_per_epoch: int) -> Callable[[int], float]:
    """Step index -> lr multiplier: linear warm-up over `warmup_iters`, then x lr_drop_factor at each
    epoch in lr_drop_epochs."""
    def factor(step: int) -> float:
        epoch = step // max(iters_per_epoch, 1)
        drops = sum(epoch >= e for e in schedule.lr_drop_epochs)
        warm = min(1.0, (step + 1) / schedule.warmup_iters) if schedule.warmup_iters else 1.0
        return warm * schedule.lr_drop_factor ** drops
    return factor


class DetectionLoss:
    """The plain student objective: the DETR set loss on every decoder layer. A distillation objective has
    the same call signature and adds its terms (trainers.distill)."""

    def __init__(self, criterion: SetCriterion):
        self.criterion = criterion

    def __call__(self, model, images, mask, targets) -> dict:
        out = model(images, mask)
        with float32_losses(images.device):
            return self.criterion(out.predictions.float(), targets)


def amp_enabled(schedule: ScheduleConfig, device: torch.device) -> bool:
    """bf16 autocast in training: when the schedule asks for it, on CUDA (on a CPU bf16 is rarely faster)."""
    return schedule.amp and device.type == "cuda"


def select_attention_kernels(device: torch.device, cudnn: bool = False) -> None:
    """Which kernels scaled_dot_product_attention may use on CUDA (a process-wide switch): by default not
    cuDNN's, which PyTorch picks first for bf16 on Hopper. A detection step's attention calls are small (batch
    2, a few hundred queries) and the step waits on its host; cuDNN's attention costs more host time per call
    than the FlashAttention / memory-efficient kernels it displaces (benchmarks/profile_step.py compares)."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cudnn)


def _overlap_teacher(loss_fn, config: TrialConfig, device: torch.device) -> bool:
    """Whether this epoch hands the objective the next batch, for its teacher to run ahead (TrialConfig.
    runtime.overlap_teacher): "auto" only on CUDA with data workers, the case it speeds up and changes nothing in."""
    if not getattr(loss_fn, "overlaps_teacher", False) or config.runtime.overlap_teacher == "off":
        return False
    return config.runtime.overlap_teacher in ("on", "thread") or (device.type == "cuda" and config.runtime.data_workers > 0)


def _device_batches(loader, device, lookahead: bool):
    """-> (images, mask, targets, upcoming) per step, on the device. With lookahead, upcoming is the next
    step's (images, mask), fetched one step early (None on the last step); without, always None."""
    batches = (_to_device(*batch, device) for batch in loader)
    if not lookahead:
        yield from ((*batch, None) for batch in batches)
        return
    current = next(batches, None)
    while current is not None:
        following = next(batches, None)
        yield (*current, following[:2] if following is not None else None)
        current = following


def _to_device(images, mask, targets, device):
    """A batch on the device, copied without blocking the host: on CUDA the loader pins its batches
    (build_loaders), so the copies do not wait for the previous step's kernels."""
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model's forward through torch.compile (inductor), for RuntimeConfig.compile (the student, and a
    distillation teacher). Its parameters and state_dict stay the model's; dynamo compiles again for a new
    input shape, then with dynamic sizes.

    Without inductor's layout optimisation (convolutions made channels_last): with dynamic sizes it wrote
    the first shape's strides of a saved input into the backward graph, and Deformable DETR's training
    failed at the next shape (`assert_size_stride`, torch 2.14 on the CPU); without it all three families
    train compiled with multi-scale batches."""
    return torch.compile(model, options={"layout_optimization": False})


def train_one_epoch(model, loss_fn, loader, optimizer, scheduler, device, config: TrialConfig, epoch: int,
                    log: Callable[[str], None], compiled: Optional[torch.nn.Module] = None) -> dict:
    """One pass over the training loader. Returns the mean of every logged loss term. `compiled`: the
    model through compile_model, which the loss then calls instead."""
    model.train()
    schedule = config.schedule
    use_amp = amp_enabled(schedule, device)
    sums = LossSums()
    n = len(loader)
    log_every = max(1, n // 4)
    overlap = _overlap_teacher(loss_fn, config, device)
    # under autocast the eager model runs on bf16 copies of its weights: autocast's values, fewer operators
    copies = use_amp and compiled is None
    # runtime.cuda_graph: the training forward and backward replayed from CUDA graphs, inside the weight copies
    # (which it reads as the weights); made per epoch, with the copies it reads; off CUDA it calls the model
    graphed = GraphedModel(model) if config.runtime.cuda_graph and compiled is None else model
    forward_model = compiled if compiled is not None else BF16Weights(graphed) if copies else graphed
    start = time.perf_counter()
    checked = None
    for step, (images, mask, targets, upcoming) in enumerate(_device_batches(loader, device, lookahead=overlap)):
        where = f"trial {config.name!r}: epoch {epoch + 1}, step {step + 1}"
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                losses = loss_fn(forward_model, images, mask, targets, upcoming=upcoming) if overlap else \
                    loss_fn(forward_model, images, mask, targets)
        except NonFiniteCostError as e:  # NaN predictions are caught by the matcher before any loss exists
            raise NonFiniteLossError(f"{where}: loss became nan (predictions are not finite: {e}); "
                                     "lower the learning rate or check the data") from e
        if checked is not None:  # the previous step's, long computed: this waits for nothing queued since
            checked.raise_if_not_finite()
        checked = FiniteLossCheck(losses, where)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if copies:
            forward_model.grads_to_master()
        if schedule.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           schedule.grad_clip)
        optimizer.found_inf = checked.not_finite  # a non-finite loss's update is skipped on the device
        optimizer.step()
        scheduler.step()
        sums.add(losses)
        if (step + 1) % log_every == 0 or step + 1 == n:
            rate = (step + 1) / (time.perf_counter() - start)
            log(f"[{config.name}] epoch {epoch + 1}/{schedule.epochs} step {step + 1}/{n} "
                f"loss {sums.totals()['loss'] / (step + 1):.4f} ({rate:.2f} it/s)")
    if checked is not None:  # the epoch's last step, before its weights are evaluated or saved
        checked.raise_if_not_finite()
    optimizer.__dict__.pop("found_inf", None)  # a step's own; not left on the optimizer
    return {k: v / max(n, 1) for k, v in sums.totals().items()}


class FiniteLossCheck:
    """Whether a step's loss is finite, read on the host one step later.

    Reading a GPU value at once would hold the host, before it queues the backward, until the GPU has run the
    whole forward and the losses (and a teacher's next forward queued before them). Instead the flag is
    copied to the host without waiting, and the caller reads it after it has queued the next step's forward,
    when it has long landed. The step's own update is skipped on the device meanwhile: `not_finite` is the
    optimizer's `found_inf`, with which the fused AdamW kernel leaves every parameter and its state untouched
    (how torch's GradScaler skips steps without reading anything back), so a NaN stops the trial with the
    weights of the step before it, not poisoned ones."""

    def __init__(self, losses: dict, where: str):
        # detached: the step's autograd graph is not kept alive until the next step
        self.losses = {k: v.detach() if torch.is_tensor(v) else v for k, v in losses.items()}
        self.where = where
        finite = torch.isfinite(self.losses["loss"])
        self.not_finite = (~finite).float()  # 0-dim float32, as found_inf
        (self.flag,), self.landed = host_copies(finite)

    def raise_if_not_finite(self) -> None:
        self.landed()
        if not bool(self.flag):
            terms = {k: round(float(v), 4) for k, v in self.losses.items()}
            raise NonFiniteLossError(f"{self.where}: loss became {terms['loss']} (terms: {terms}); lower the "
                                     "learning rate or check the data")


class LossSums:
    """Running sums of a step's logged loss terms, kept on their device until read.

    Reading a GPU value makes the host wait for every kernel queued before it: a float() per term per step
    would hold the host at the end of each step until the GPU has finished the backward and the optimizer,
    instead of letting it queue the next step meanwhile. The terms are summed in float64, step after step,
    as Python floats would be (float32 values convert exactly), so the totals are the same numbers."""

    def __init__(self):
        self.names: list[str] = []
        self.sum = None  # float64 [len(names)] on the terms' device
        self.numbers: dict[str, float] = {}  # terms given as Python numbers, and sums read back

    def add(self, losses: dict) -> None:
        names = [k for k, v in losses.items() if torch.is_tensor(v)]
        if self.sum is not None and names != self.names:  # another set of terms: read the sums so far back
            self.numbers, self.sum = self.totals(), None
        for k, v in losses.items():
            if not torch.is_tensor(v):
                self.numbers[k] = self.numbers.get(k, 0.0) + float(v)
        if names:
            values = torch.stack([losses[k].detach().reshape(()).float() for k in names]).double()
            self.names, self.sum = names, values if self.sum is None else self.sum + values

    def totals(self) -> dict[str, float]:
        """The sums as Python floats (one host-device sync)."""
        out = dict(self.numbers)
        if self.sum is not None:
            for k, v in zip(self.names, self.sum.tolist()):
                out[k] = out.get(k, 0.0) + v
        return out


def build_loaders(config: TrialConfig, pin_memory: bool = False):
    """pin_memory (training on CUDA): batches in page-locked memory, whose copies to the GPU are asynchronous
    (from pageable memory CUDA may first wait for the stream's queued kernels)."""
    train_set, val_set = build_dataset(config.data, "train"), build_dataset(config.data, "val")
    sampler_gen = torch.Generator()
    batch = partial(collate, pad_multiple=config.data.pad_size_divisor)
    train_loader = DataLoader(train_set, batch_size=config.schedule.batch_size,
                              sampler=RandomSampler(train_set, generator=sampler_gen), collate_fn=batch,
                              num_workers=config.runtime.data_workers, drop_last=False, pin_memory=pin_memory)
    val_loader = DataLoader(val_set, batch_size=config.schedule.batch_size, sampler=SequentialSampler(val_set),
                            collate_fn=batch, num_workers=config.runtime.data_workers, pin_memory=pin_memory)
    return train_set, val_set, train_loader, val_loader, sampler_gen


def build_loss(config: TrialConfig, num_classes: int, device: torch.device):
    """The training objective of this trial: detection loss, plus distillation when configured."""
    criterion = SetCriterion(num_classes, config.loss)
    if config.distill.method == "none":
        return DetectionLoss(criterion)
    from trainers.distill import build_distillation_loss
    return build_distillation_loss(config, criterion, num_classes, device,
                                   bf16_teacher=amp_enabled(config.schedule, device),
                                   compile_teacher=compile_model if config.runtime.compile else None)


def run_trial(config: TrialConfig, workdir: Path, report: Optional[Report] = None,
              log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict:
    """Train and evaluate one trial; resume from workdir/checkpoint.pt if present. Returns the last metrics.

    report(metrics, checkpoint_path) is called after every epoch; metrics hold 'epoch', the mean train loss
    terms (prefixed 'train/'), 'lr', 'epoch_time' and, on evaluation epochs, AP, AP50, AP75, APs, APm, APl.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    device = select_device(config.runtime.device)
    select_attention_kernels(device)
    seed_everything(config.seed)
    graphs = [k for k in ("cuda_graph", "teacher_cuda_graph") if getattr(config.runtime, k)]
    if graphs and device.type != "cuda":
        log(f"[{config.name}] runtime.{' and '.join(graphs)}: CUDA only, the {device.type} runs eagerly")

    train_set, val_set, train_loader, val_loader, sampler_gen = build_loaders(config, device.type == "cuda")
    num_classes = train_set.num_classes
    model = build_detector(config.model, num_classes)
    if config.init_checkpoint is not None:
        model.load_state_dict(load_checkpoint(config.init_checkpoint)["model"])
    model.to(device)
    loss_fn = build_loss(config, num_classes, device)
    bf16_norms = amp_enabled(config.schedule, device) and config.schedule.amp_layer_norm == "bfloat16"
    for net in (model, getattr(loss_fn, "teacher", None)):
        if net is not None:
            set_bf16_layer_norm(net, bf16_norms)
    # the objective's own learnable parts (distillation adapters) train with the student at the base lr
    extra = getattr(loss_fn, "trainable", None)
    groups = param_groups(model, config.schedule)
    if extra is not None and any(p.requires_grad for p in extra.parameters()):
        groups.append({"params": [p for p in extra.parameters() if p.requires_grad], "lr": config.schedule.lr,
                       "name": "distill"})
    # fused: one kernel for all parameters (a third of the optimizer time of a small CPU step)
    optimizer = torch.optim.AdamW(groups, lr=config.schedule.lr, weight_decay=config.schedule.weight_decay,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, len(train_loader)))

    start_epoch, history = 0, []
    ckpt_path = workdir / CHECKPOINT_NAME
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        if extra is not None:
            extra.load_state_dict(ckpt["distill"])
        if "optimizer" in ckpt:  # absent once the trial finished: then nothing is left to train
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        log(f"[{config.name}] resuming after epoch {start_epoch} from {ckpt_path}")

    metrics = history[-1] if history else {}
    compiled = compile_model(model) if config.runtime.compile and start_epoch < config.schedule.epochs else None
    for epoch in range(start_epoch, config.schedule.epochs):
        seed_everything(epoch_seed(config.seed, epoch))
        sampler_gen.manual_seed(epoch_seed(config.seed, epoch))
        t0 = time.perf_counter()
        train_stats = train_one_epoch(model, loss_fn, train_loader, optimizer, scheduler, device, config, epoch, log,
                                      compiled)
        metrics = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                   **{f"train/{k}": v for k, v in train_stats.items()}}
        last = epoch + 1 == config.schedule.epochs
        if last or (epoch + 1) % config.schedule.eval_every == 0:
            metrics.update(evaluate(model, val_loader, device, val_set.category_ids, val_set.coco,
                                    amp=config.schedule.amp))
            log(f"[{config.name}] epoch {epoch + 1}: AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}")
        metrics["epoch_time"] = time.perf_counter() - t0
        history.append(metrics)
        payload = {"model": model.state_dict(), "epoch": epoch, "history": history,
                   "model_config": config.model.model_dump(mode="json"), "config": config.model_dump(mode="json"),
                   "category_ids": list(train_set.category_ids),
                   "distill": extra.state_dict() if extra is not None else None}
        if not last:  # a finished trial is never resumed: its optimizer state would double the file for nothing
            payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state())
        save_checkpoint(ckpt_path, payload)
        if report is not None:
            report(metrics, ckpt_path)
    return metrics
