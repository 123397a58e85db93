"""Small tensors moved from the host to the device inside a step without a host-device sync: constants made
from Python numbers, matched indices. The other way, device to host: accel.host."""
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


def cached_device_constant(values: tuple, like: Tensor) -> Tensor:
    """`device_constant` for values a step uses again and again (loss weights, a feature map's sizes): made
    and copied once per values, dtype and device, then the same tensor every call. Read it, never write it.
    values: a tuple (of tuples) of Python numbers."""
    if type(like) is not Tensor or torch.compiler.is_compiling():  # a fake or other subclass tensor, or traced
        # by dynamo (which would guard on the cache): made for the call, never kept
        return device_constant(list(values), like)
    key = (values, like.dtype, like.device)
    if key not in _cached:
        if like.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # made now it would be a node of the graph (its values there only while the graph replays) in the
            # graph's memory pool, yet cached for every later call
            raise RuntimeError(f"constant {values} first made during CUDA graph capture: run the same call "
                               "eagerly first (accel.graphed_teacher.GraphedTeacher does)")
        _cached[key] = device_constant(list(values), like)
    return _cached[key]


_cached: dict = {}


def host_to_device(tensor: Tensor, device) -> Tensor:
    """A host tensor copied to `device` without blocking the host. To a GPU through pinned memory: CUDA may
    make a copy from pageable memory wait for the stream's queued kernels first (its API's sync behaviour,
    "might be synchronous"), which would hold the host back to the GPU's pace; from pinned memory the copy is
    asynchronous, and PyTorch's pinned-memory cache keeps the block until the copy has run."""
    device = torch.device(device)
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
