"""Small tensors moved between host and device inside a step without a host-device sync: constants made from
Python numbers and matched indices to the device, costs and flags to the host."""
from typing import Callable, Optional

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
                               "eagerly first (teacher_graph.GraphedTeacher does)")
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


def host_copies(*tensors: Optional[Tensor]) -> tuple[list, Callable[[], None]]:
    """Device tensors (None passes through) copied to the host without blocking -> (host tensors, `landed()`).
    From a GPU the copies go to pinned memory in stream order and `landed()` waits on a CUDA event for them
    (and nothing queued after); read the host tensors only after it. On the CPU they are the tensors, landed."""
    host = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if device.type != "cuda":
        return host, lambda: None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return host, event.synchronize  # releases the GIL while it waits
