"""What a training loop reads of its steps on the host, read late: whether a step's loss is finite, and the
epoch's loss sums. Reading a GPU value at once would hold the host until the GPU has run everything queued
before it, instead of letting it queue the next step meanwhile."""
import torch

from trainers.accel.host import host_copies


class FiniteLossCheck:
    """Whether a step's loss is finite, read on the host one step later.

    Reading a GPU value at once would hold the host, before it queues the backward, until the GPU has run the
    whole forward and the losses (and a teacher's next forward queued before them). Instead the flag is
    copied to the host without waiting, and the caller reads it after it has queued the next step's forward,
    when it has long landed. The step's own update is skipped on the device meanwhile: `not_finite` is the
    optimizer's `found_inf`, with which the fused AdamW kernel leaves every parameter and its state untouched
    (how torch's GradScaler skips steps without reading anything back), so a NaN stops the trial with the
    weights of the step before it, not poisoned ones. error: the exception `raise_if_not_finite` raises."""

    def __init__(self, losses: dict, where: str, error: type[Exception] = RuntimeError):
        # detached: the step's autograd graph is not kept alive until the next step
        self.losses = {k: v.detach() if torch.is_tensor(v) else v for k, v in losses.items()}
        self.where, self.error = where, error
        finite = torch.isfinite(self.losses["loss"])
        self.not_finite = (~finite).float()  # 0-dim float32, as found_inf
        (self.flag,), self.landed = host_copies(finite)

    def raise_if_not_finite(self) -> None:
        self.landed()
        if not bool(self.flag):
            terms = {k: round(float(v), 4) for k, v in self.losses.items()}
            raise self.error(f"{self.where}: loss became {terms['loss']} (terms: {terms}); lower the learning "
                             "rate or check the data")


class LossSums:
    """Running sums of a step's logged loss terms, kept on their device until read.

    A float() per term per step would hold the host at the end of each step until the GPU has finished the
    backward and the optimizer. The terms are summed in float64, step after step, as Python floats would be
    (float32 values convert exactly), so the totals are the same numbers."""

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
