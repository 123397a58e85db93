"""The frozen teacher's forward replayed from CUDA graphs (ScheduleConfig.teacher_cuda_graph).

At batch 2 a GPU distillation step waits on its host (README, "The steps wait on the host"): the teacher's
forward is ~1000 kernels the host issues one by one, about as long as the GPU takes to run them. A CUDA graph
captured once per input shape issues them all in one call: the host is left with the student's step, and the
teacher's kernels fill the GPU's idle time between the student's.

What capture needs of a forward: it never waits for the GPU (tests/test_fake_cuda.py checks every family's)
and copies nothing from the host (its constants, e.g. deformable attention's level sizes, come from
`constants.cached_device_constant`, filled by the eager forward that precedes every capture). The values are
the eager forward's: the same kernels on the same inputs (tests/test_gpu.py -k graph).

A shape is captured the second time it comes: with multi-scale training most batch shapes come once, and a
capture costs about two eager forwards (a warm-up on the capture stream and the capture itself). At most
`max_graphs` graphs are kept, the least recently used dropped first. They share one memory pool, which is safe
because they never run at once and each call copies its outputs out of the pool before returning.
"""
import warnings
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor, nn

from detrdistill.trainers.models.output import map_tensors


class GraphedTeacher(nn.Module):
    """`teacher(images, mask)` without gradients on CUDA, replayed from a graph for an input shape seen before;
    otherwise (CPU, gradients on, a shape's first time) the teacher called as it is. Same output type."""

    def __init__(self, teacher: nn.Module, max_graphs: int = 8):
        super().__init__()
        self.teacher = teacher
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()  # input key -> _Graph, least recently used first
        self.seen: set = set()  # input keys run once eagerly
        self.failed: Optional[str] = None  # why a capture failed; the teacher then always runs eagerly
        self._pool = None
        self._stream = None

    def forward(self, images: Tensor, mask: Optional[Tensor] = None):
        if images.device.type != "cuda" or torch.is_grad_enabled() or self.failed is not None:
            return self.teacher(images, mask)
        key = _input_key(images, mask)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:  # the eager forward also makes the shape's constants and cuDNN's choices
                self.seen.add(key)
                return self.teacher(images, mask)
            graph = self._capture(key, images, mask)
            if graph is None:
                return self.teacher(images, mask)
        self.graphs.move_to_end(key)
        return graph(images, mask)

    def reset(self) -> None:
        """Drop every graph: call it after changing the teacher's settings (e.g. its LayerNorms' output dtype) or
        moving its weights, which the graphs read where they were at capture."""
        self.graphs.clear()
        self.seen.clear()

    def _capture(self, key, images: Tensor, mask: Optional[Tensor]) -> Optional["_Graph"]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(images.device)
        try:
            graph = _Graph(self.teacher, images, mask, self._pool, self._stream)
        except Exception as e:  # an operator capture does not allow: the teacher runs as before, said once
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"teacher_cuda_graph: capturing the teacher's forward failed ({self.failed}); it runs "
                          "without graphs", RuntimeWarning, stacklevel=3)
            return None
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)  # its memory goes back to the shared pool
        return graph


class _Graph:
    """One input shape's captured forward: static input buffers (outside the graph's pool, so no other
    graph's capture can place its own tensors there), the graph, its output structure in the pool."""

    def __init__(self, teacher: nn.Module, images: Tensor, mask: Optional[Tensor], pool, stream):
        self.images = images.clone()
        self.mask = mask.clone() if mask is not None else None
        device = images.device
        # autocast as the caller set it, its cast cache off: a cast cached during capture would live in the pool
        amp = dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"),
                   enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.autocast(**amp):  # the capture stream's own lazily made state
            teacher(self.images, self.mask)  # (cuBLAS's workspace for this stream) before capture
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the helper thread may wait on CUDA events of the step meanwhile (matching.start_on_host)
        with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"), \
                torch.autocast(**amp):
            self.output = teacher(self.images, self.mask)

    def __call__(self, images: Tensor, mask: Optional[Tensor]):
        self.images.copy_(images)
        if mask is not None:
            self.mask.copy_(mask)
        self.graph.replay()
        # out of the pool: the next replay (this graph's or another's) overwrites it; parameters pass through
        return map_tensors(lambda t: t if isinstance(t, nn.Parameter) else t.clone(), self.output)


def _input_key(images: Tensor, mask: Optional[Tensor]) -> tuple:
    """What a graph is captured for: the inputs' shapes, dtypes, layout and device, and the autocast setting."""
    return (tuple(images.shape), images.stride(), images.dtype, images.device,
            None if mask is None else (tuple(mask.shape), mask.stride(), mask.dtype),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
