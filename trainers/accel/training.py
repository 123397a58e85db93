"""One epoch's training machinery (accel.prepare): what the engine's step calls, and what it does around the
backward and the optimizer, so that on a GPU the host queues the steps without waiting for the device."""
import torch

from trainers.accel.bf16_weights import BF16Weights
from trainers.accel.graphed_model import GraphedModel
from trainers.accel.readback import FiniteLossCheck, LossSums
from trainers.accel.teacher_ahead import RunAhead, runs_ahead


class Accelerated:
    """`model` and `loss_fn` as a step calls them (`loss_fn(model, images, mask, targets)`), the epoch's device
    `batches`, `after_backward()`, the loss's deferred finiteness `check`, `finish()` after the last step, and
    the logged loss `sums`.

    The model is `compiled` when given (RuntimeConfig.compile: then on autocast alone, whose casts the compiler
    fuses); else under `amp` it runs on bf16 copies of its weights (BF16Weights: autocast's values, fewer
    operators), with runtime.cuda_graph its training forward and backward replayed from CUDA graphs inside the
    copies (which it reads as the weights; off CUDA it calls the model). Both are made per epoch. A
    distillation objective's teacher runs one batch ahead where `runs_ahead` says (RunAhead)."""

    def __init__(self, model, loss_fn, optimizer, runtime, device: torch.device, amp: bool, compiled=None,
                 error: type[Exception] = RuntimeError):
        self.device, self.optimizer, self.error = device, optimizer, error
        graphed = GraphedModel(model) if runtime.cuda_graph and compiled is None else model
        self.copies = BF16Weights(graphed) if amp and compiled is None else None
        self.model = compiled if compiled is not None else self.copies if self.copies is not None else graphed
        self.ahead = runs_ahead(loss_fn, runtime, device)
        self.loss_fn = RunAhead(loss_fn, thread=runtime.overlap_teacher == "thread") if self.ahead else loss_fn
        self.sums = LossSums()
        self.checked = None  # the last step's FiniteLossCheck

    def batches(self, loader):
        """The loader's (images, mask, targets) on the device, copied without blocking the host (on CUDA the
        loader pins its batches). Running the teacher ahead, each batch is fetched one step early and the next
        one's images and mask are handed to `loss_fn` before a step."""
        batches = (_to_device(*batch, self.device) for batch in loader)
        if not self.ahead:
            yield from batches
            return
        current = next(batches, None)
        while current is not None:
            following = next(batches, None)
            self.loss_fn.upcoming = following[:2] if following is not None else None
            yield current
            current = following

    def check(self, losses: dict, where: str) -> None:
        """Starts this step's finiteness check, whose update the optimizer skips on the device if the loss is not
        finite (its found_inf), and reads the previous step's, long landed: raises `error` where it failed."""
        if self.checked is not None:
            self.checked.raise_if_not_finite()
        self.checked = FiniteLossCheck(losses, where, self.error)
        self.optimizer.found_inf = self.checked.not_finite

    def after_backward(self) -> None:
        """The weight copies' gradients into the float32 parameters' (before clipping and the optimizer)."""
        if self.copies is not None:
            self.copies.grads_to_master()

    def finish(self) -> None:
        """After the epoch's last step: its loss checked before the weights are evaluated or saved, and the
        optimizer's found_inf (a step's own) taken off it."""
        if self.checked is not None:
            self.checked.raise_if_not_finite()
        self.optimizer.__dict__.pop("found_inf", None)


def _to_device(images, mask, targets, device):
    """A batch on the device, copied without blocking the host: from pinned memory the copies do not wait for
    the previous step's kernels."""
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets
