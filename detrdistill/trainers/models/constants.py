"""Small constant tensors made from Python numbers inside a forward pass, without a host-device sync."""
import torch
from torch import Tensor


def device_constant(values, like: Tensor) -> Tensor:
    """values (nested lists of Python numbers) -> a tensor of like's dtype on like's device.

    torch.tensor(values, device=cuda) copies synchronously: the host waits for every kernel queued before
    it, so a forward that does it per layer can never run ahead of the GPU (and a step pays its launch
    latency in full). Built on the host and copied without blocking instead; the copy is queued in stream
    order, so the kernels after it see the values.
    """
    return torch.tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)
