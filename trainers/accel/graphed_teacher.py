"""The frozen teacher's forward replayed from CUDA graphs (RuntimeConfig.teacher_cuda_graph).

At batch 2 a GPU distillation step waits on its host: the teacher's forward is a long run of small kernels the
host issues one by one, about as long as the GPU takes to run them (benchmarks/step.py --distill --teacher-graph
measures it). A CUDA graph captured once per input shape issues them all in one call: the host is left with the
student's step, and the teacher's kernels fill the GPU's idle time between the student's.

What capture needs of a forward: it never waits for the GPU (tests/test_fake_cuda.py checks every family's)
and copies nothing from the host (its constants, e.g. deformable attention's level sizes, come from
`models.constants.cached_device_constant`, filled by the eager forward that precedes every capture). The
values are the eager forward's: the same kernels on the same inputs (tests/test_gpu.py -k graph; on the CPU
with emulated graphs, tests/test_graph_emulation.py).

A shape is captured the second time it comes, at most `max_graphs` are kept (cuda_graphs.ShapeGraphs). They
share one memory pool, which is safe because they never run at once and each call copies its outputs out of
the pool before returning.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from trainers.accel.cuda_graphs import ShapeGraphs, autocast_setting, input_key
from trainers.models.output import map_tensors


class GraphedTeacher(ShapeGraphs):
    """`teacher(images, mask)` without gradients on CUDA, replayed from a graph for an input shape seen before;
    otherwise (CPU, gradients on, a shape's first time) the teacher called as it is. Same output type."""

    what = "teacher_cuda_graph (the teacher's forward)"

    def __init__(self, teacher: nn.Module, max_graphs: int = 8):
        super().__init__(max_graphs)
        self.teacher = teacher

    def forward(self, images: Tensor, mask: Optional[Tensor] = None):
        graph = None
        if self.capturable(images.device) and not torch.is_grad_enabled():
            graph = self._graph_for(input_key([images, mask]), lambda: _Graph(
                self.teacher, images, mask, *self._capture_resources(images.device)))
        return graph(images, mask) if graph is not None else self.teacher(images, mask)


class _Graph:
    """One input shape's captured forward: static input buffers (outside the graph's pool, so no other
    graph's capture can place its own tensors there), the graph, its output structure in the pool."""

    def __init__(self, teacher: nn.Module, images: Tensor, mask: Optional[Tensor], pool, stream):
        self.images = images.clone()
        self.mask = mask.clone() if mask is not None else None
        device = images.device
        amp = autocast_setting()  # the caller's, its cast cache off
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.autocast(**amp):  # the capture stream's own lazily made state
            teacher(self.images, self.mask)  # (cuBLAS's workspace for this stream) before capture
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the helper thread may wait on CUDA events of the step meanwhile (host.start_on_host)
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

