"""One trial: build data and model, train with AdamW, evaluate with COCO mAP, checkpoint every epoch, resume.

`run_trial(config, workdir, report)` is the whole interface. It knows nothing of Ray or MLflow: whoever runs
it (a test, a Ray worker) receives each epoch's metrics and checkpoint through `report(metrics, checkpoint)`.

`train_one_epoch` is DETR's loop: each batch to the device, forward and loss, backward, clipping, the
optimizer's step, a log line. What makes it fast on a GPU (bf16 weight copies, CUDA graphs, torch.compile, the
distillation teacher run ahead, device values read a step late) comes from trainers.accel: the model and loss a
step calls, its device batches, what follows the backward.

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

from trainers import accel
from trainers.checkpoint import load_checkpoint, rng_state, save_checkpoint
from trainers.config import ScheduleConfig, TrialConfig
from trainers.criterion import SetCriterion, float32_losses
from trainers.data.batching import collate
from trainers.data.coco import build_dataset
from trainers.evaluate import evaluate
from trainers.matching import NonFiniteCostError
from trainers.models import build_detector
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
    """Step index -> lr multiplier: linear warm-up from `warmup_ratio` over `warmup_iters`, then x lr_drop_factor
    at each epoch in lr_drop_epochs."""
    def factor(step: int) -> float:
        epoch = step // max(iters_per_epoch, 1)
        drops = sum(epoch >= e for e in schedule.lr_drop_epochs)
        warm = 1.0
        if step < schedule.warmup_iters:  # MMDetection's linear warm-up: warmup_ratio at step 0, 1 at warmup_iters
            warm = schedule.warmup_ratio + (1 - schedule.warmup_ratio) * step / schedule.warmup_iters
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


def train_one_epoch(model, loss_fn, loader, optimizer, scheduler, device, config: TrialConfig, epoch: int,
                    log: Callable[[str], None], compiled: Optional[torch.nn.Module] = None) -> dict:
    """One pass over the training loader. Returns the mean of every logged loss term. `compiled`: the
    model through accel.compile_model, which the loss then calls instead."""
    model.train()
    amp = amp_enabled(config.schedule, device)
    run = accel.prepare(model, loss_fn, optimizer, config.runtime, device, amp, compiled, error=NonFiniteLossError)
    n = len(loader)
    log_every = max(1, n // 4)
    start = time.perf_counter()
    for step, (images, mask, targets) in enumerate(run.batches(loader)):
        where = f"trial {config.name!r}: epoch {epoch + 1}, step {step + 1}"
        losses = train_step(run, images, mask, targets, optimizer, config.schedule, amp, where)
        scheduler.step()
        run.sums.add(losses)
        if (step + 1) % log_every == 0 or step + 1 == n:
            rate = (step + 1) / (time.perf_counter() - start)
            log(f"[{config.name}] epoch {epoch + 1}/{config.schedule.epochs} step {step + 1}/{n} "
                f"loss {run.sums.totals()['loss'] / (step + 1):.4f} ({rate:.2f} it/s)")
    run.finish()  # the last step's loss checked, before the epoch's weights are evaluated or saved
    return {k: v / max(n, 1) for k, v in run.sums.totals().items()}


def train_step(run, images, mask, targets, optimizer, schedule: ScheduleConfig, amp: bool, where: str) -> dict:
    """One step on a batch on the device: forward and losses (under bf16 autocast with amp), backward, gradient
    clipping, the optimizer's step. run: the epoch's accel.prepare. Returns the losses."""
    try:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            losses = run.loss_fn(run.model, images, mask, targets)
    except NonFiniteCostError as e:  # NaN predictions are caught by the matcher before any loss exists
        raise NonFiniteLossError(f"{where}: loss became nan (predictions are not finite: {e}); "
                                 "lower the learning rate or check the data") from e
    run.check(losses, where)  # read a step late; a non-finite loss's update is skipped on the device
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    run.after_backward()
    if schedule.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], schedule.grad_clip)
    optimizer.step()
    return losses


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


def build_loss(config: TrialConfig, categories: list[str], device: torch.device):
    """The training objective of this trial (categories: the dataset's names, in label order): detection loss,
    plus distillation when configured."""
    criterion = SetCriterion(len(categories), config.loss)
    if config.distill.method == "none":
        return DetectionLoss(criterion)
    from trainers.distill import build_distillation_loss
    return build_distillation_loss(config, criterion, categories, device, amp_enabled(config.schedule, device))


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
    accel.select_attention_kernels(device)
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
    loss_fn = build_loss(config, train_set.category_names, device)
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
    # fused: one kernel for all parameters (benchmarks/step.py times a step with it)
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
    compile = config.runtime.compile and start_epoch < config.schedule.epochs  # once a trial, not once an epoch
    compiled = accel.compile_model(model) if compile else None
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
                   "category_ids": list(train_set.category_ids), "category_names": list(train_set.category_names),
                   "distill": extra.state_dict() if extra is not None else None}
        if not last:  # a finished trial is never resumed: its optimizer state would double the file for nothing
            payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state())
        save_checkpoint(ckpt_path, payload)
        if report is not None:
            report(metrics, ckpt_path)
    return metrics
