"""CUDA graphs emulated on the CPU, so that what the graph wrappers do around a capture
(trainers/accel/cuda_graphs.py: static inputs, outputs rebuilt around replayed tensors, gradients set where the
backward graph leaves them, weights read where they were at capture) runs in every test session, not only on a
GPU.

A capture records the aten operators that run under it, below autograd and autocast (as a CUDA graph records
their kernels), each with the very tensors it read and wrote; a replay runs them again on those tensors, in
order, and writes each result into the tensor the capture produced (a CUDA graph's fixed addresses). A capture
runs nothing that lasts: what it wrote into tensors made before it is restored at its end (batch norm's running
statistics), and what it made holds NaN until a replay. So, as on a GPU: a replay reads what its input buffers and weights hold now (an input or weight replaced by another
tensor instead of updated in place goes unseen), overwrites the outputs of the previous replay, and draws new
random numbers. An operator after which the host reads a GPU result (.item(), nonzero, a boolean mask index)
raises during capture, as CUDA's capture does. Not emulated: memory reuse between graphs of one pool, streams
(one CPU stream), and the copies between host and device (test_fake_cuda.py checks the forwards for those).

Use `emulated_cuda_graphs(monkeypatch)`: CPU tensors then count as capturable, and torch.cuda's graph and
stream calls are these.
"""
import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# operators whose CUDA kernels hand a result to the host (the host waits): refused in capture
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
              "unique_consecutive", "equal", "is_nonzero"}
_capturing = threading.local()


class EmulatedGraph:
    """torch.cuda.CUDAGraph's capture_begin/replay on the CPU: the operators recorded, replayed in order."""

    def __init__(self):
        self.operators: list = []  # (operator, args, kwargs, outputs)

    def replay(self):
        with _kernels_only():
            for func, args, kwargs, out in self.operators:
                new = func(*args, **kwargs)
                for recorded, fresh in zip(tree_leaves(out), tree_leaves(new)):
                    if isinstance(recorded, torch.Tensor) and recorded is not fresh:
                        recorded.copy_(fresh)  # into the capture's output: the graph's address


class _Recorder(TorchDispatchMode):
    """Records the operators of a capture. They run (the code around them needs their results' shapes), but a
    capture runs nothing: at its end what they wrote into tensors made before it is restored, and what they
    made holds NaN until a replay."""

    def __init__(self, graph: EmulatedGraph):
        super().__init__()
        self.graph = graph
        self.made: set = set()  # the storages the capture's operators made
        self.overwritten: list = []  # (tensor made before, its values before the capture wrote it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in HOST_READS or bool_index:
            raise RuntimeError(f"operation not permitted when stream is capturing: aten.{name} (emulated capture)")
        for written in _written(func, args, kwargs):
            if _storage(written) not in self.made:
                self.overwritten.append((written, written.clone()))
        read = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        if not func.is_view:  # a view's output aliases its input: nothing to recompute
            self.graph.operators.append((func, args, kwargs, out))
            # new storages only: an in-place operator returns the tensor it wrote
            self.made.update(_storage(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                             and _storage(t) not in read)
        return out

    def end(self):
        with _kernels_only():
            for tensor, before in reversed(self.overwritten):
                tensor.copy_(before)
            for _, _, _, out in self.graph.operators:
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and _storage(t) in self.made:
                        t.fill_(float("nan"))


@contextlib.contextmanager
def _kernels_only():
    """Operators run as recorded, as a graph's kernels: no autocast (the recorded ones are after its casts),
    no autograd, writes unseen by autograd (tensors' version counters stay)."""
    with torch.autocast("cpu", enabled=False), torch._C._AutoDispatchBelowADInplaceOrView():
        yield


# operators that write arguments their schema does not mark as written: batch norm's running statistics
_UNMARKED_WRITES = {"native_batch_norm": (3, 4), "cudnn_batch_norm": (3, 4), "miopen_batch_norm": (3, 4)}


def _written(func, args, kwargs) -> list:
    """The tensors an operator writes in place (its schema's mutable arguments)."""
    written = [args[i] for i in _UNMARKED_WRITES.get(func.overloadpacket.__name__, ())
               if i < len(args) and isinstance(args[i], torch.Tensor)]
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return written


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@contextlib.contextmanager
def _graph(graph: EmulatedGraph, pool=None, stream=None, capture_error_mode="global"):
    """torch.cuda.graph on the CPU (this thread's operators only: capture_error_mode thread_local's view)."""
    _capturing.active = True
    recorder = _Recorder(graph)
    try:
        with recorder:
            yield
        recorder.end()
    finally:
        _capturing.active = False


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


def emulated_cuda_graphs(monkeypatch):
    """Patch torch.cuda's graph and stream calls with the emulation and let ShapeGraphs capture on the CPU."""
    from trainers.accel.cuda_graphs import ShapeGraphs
    monkeypatch.setattr(ShapeGraphs, "capturable", staticmethod(lambda device: device.type == "cpu"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", EmulatedGraph)
    monkeypatch.setattr(torch.cuda, "graph", _graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: getattr(_capturing, "active", False))
