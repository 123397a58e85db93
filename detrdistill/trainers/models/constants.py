"""Small host tensors (constants made from Python numbers, matched indices) moved to the device inside a
step without a host-device sync."""
import torch
from torch import Tensor


def device_constant(values, like: Tensor) -> Tensor:
    """values (nested lists of Python numbers) -> a tensor of like's dtype on like's device.

    torch.tensor(values, device=cuda) copies synchronously: the host waits for every kernel queued before
    it, so a forward that does it per layer can never run ahead of the GPU (and a step pays its launch
    latency in full). Built on the host and copied without blocking instead (`host_to_device`); the copy is
    queued in stream order, so the kernels after it see the values.
    """
    return host_to_device(torch.tensor(values, dtype=like.dtype), like.device)


def host_to_device(tensor: Tensor, device) -> Tensor:
    """A host tensor copied to `device` without blocking the host. To a GPU through pinned memory: CUDA may
    make a copy from pageable memory wait for the stream's queued kernels first (its API's sync behaviour,
    "might be synchronous"), which would hold the host back to the GPU's pace; from pinned memory the copy is
    asynchronous, and PyTorch's pinned-memory cache keeps the block until the copy has run."""
    device = torch.device(device)
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
