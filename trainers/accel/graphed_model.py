"""A detector's training forward and backward replayed from CUDA graphs (RuntimeConfig.cuda_graph).

At batch 2 a GPU training step waits on its host: the forward and backward are a long run of small kernels the
host issues one by one, and bf16 shortens the GPU's part of a step but not the host's (benchmarks/step.py and
benchmarks/graph_ops.py measure it). Here the forward and the backward of one input shape are each captured once
as a CUDA graph and then replayed, one launch each; between them the losses, the matching and (after) the
optimizer run as before. The values are the eager step's: the same kernels on the same inputs (tests/test_gpu.py
-k graphed_training; on the CPU with emulated graphs, tests/test_graph_emulation.py); dropout draws other random
numbers (the graph's own offsets in the same generator).

How, as torch.cuda.make_graphed_callables does it, with three differences: the detector's structured output
(DetectorOutput) is rebuilt around the replayed tensors; an input shape is captured the second time it comes
and at most `max_graphs` shapes are kept (cuda_graphs.ShapeGraphs); and the backward writes
each weight's gradient where the graph leaves it, set as the weight's `.grad` (no copy per weight, which
autograd's accumulation would make: a launch each). What the forward reads as weights must stay the same
tensors, updated in place: the optimizer's parameters, and BF16Weights' copies (wrap this inside it:
`BF16Weights(GraphedModel(model))`). Capture needs a forward that never waits for the GPU and copies nothing
from the host (see graphed_teacher.py). Batch norm's running statistics are restored after the warm-up
that precedes a capture, so that each replayed step updates them once, as an eager one does.

Memory: a graph keeps its forward's saved activations (an eager step frees them after the backward) and the
gradients; the graphs of all shapes share one memory pool, which is safe because a step replays its forward and
then its backward before any other graph runs (every step of a training loop does).
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from trainers.accel.cuda_graphs import ShapeGraphs, autocast_setting, input_key
from trainers.models.output import QueryGroup, map_tensors, tensors_in


class GraphedModel(ShapeGraphs):
    """`model(images, mask, queries=)` in training (train mode, gradients on) on CUDA, replayed from graphs for
    an input shape seen before; otherwise the model called as it is. Same output type."""

    what = "cuda_graph (the student's training step)"

    def __init__(self, model: nn.Module, max_graphs: int = 2):
        super().__init__(max_graphs)
        self.model = model

    def forward(self, images: Tensor, mask: Optional[Tensor] = None, queries: Optional[QueryGroup] = None):
        graph = None
        if self.capturable(images.device) and torch.is_grad_enabled() and self.model.training:
            inputs = _flat_inputs(images, mask, queries)
            graph = self._graph_for(input_key(inputs), lambda: _StepGraph(
                self.model, inputs, *self._capture_resources(images.device)))
        return graph(inputs) if graph is not None else self.model(images, mask, queries=queries)


class _StepGraph:
    """One input shape's forward and backward graphs, their static inputs (outside the pool), outputs and
    gradients (in it)."""

    def __init__(self, model: nn.Module, inputs: list, pool, stream):
        self.model = model
        self.static = [t.clone() if t is not None else None for t in inputs]
        # what the forward reads as weights now (under BF16Weights: its bf16 copies in the parameter slots)
        self.weights = [p for p in model.parameters() if p.requires_grad]
        device = inputs[0].device
        amp = autocast_setting()
        statistics = _running_statistics(model)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up: lazily made state (cuBLAS's workspace for this stream, the
            for _ in range(2):           # autograd engine's) before capture, forward and backward
                with torch.autocast(**amp):
                    out = self._forward()
                diff = [t for t in tensors_in(out) if t.requires_grad and t.is_floating_point()]
                with _no_autocast():
                    torch.autograd.grad(diff, self.weights, [torch.zeros_like(t) for t in diff], allow_unused=True)
                del out, diff
        torch.cuda.current_stream(device).wait_stream(stream)
        _restore(statistics)  # the warm-up's updates of batch norm's running statistics undone
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=pool, stream=stream, capture_error_mode="thread_local"), \
                torch.autocast(**amp):
            self.output = self._forward()
        leaves = list(tensors_in(self.output))
        weight_ids = {id(w) for w in self.weights}
        # a weight itself in the output (e.g. the query embedding) passes through; everything else is replayed
        self.replayed = [id(t) not in weight_ids for t in leaves]
        self.outputs = [t for t, r in zip(leaves, self.replayed) if r]
        self.differentiable = [t.requires_grad and t.is_floating_point() for t in self.outputs]
        self.grad_outputs = [torch.empty_like(t) for t, d in zip(self.outputs, self.differentiable) if d]
        # outside autocast, as an eager step's backward runs (this is inside the caller's forward, under its
        # autocast, which would cast the backward's matmuls to bf16, those of float32 regions too)
        with torch.cuda.graph(self.bwd, pool=pool, stream=stream, capture_error_mode="thread_local"), \
                _no_autocast():
            grads = torch.autograd.grad([t for t, d in zip(self.outputs, self.differentiable) if d], self.weights,
                                        self.grad_outputs, allow_unused=True)
        self.grads = [(w, g) for w, g in zip(self.weights, grads) if g is not None]

    def _forward(self):
        images, mask, *q = self.static
        queries = QueryGroup(*q) if q else None
        return self.model(images, mask, queries=queries)

    def __call__(self, inputs: list):
        for static, t in zip(self.static, inputs):
            if t is not None:
                static.copy_(t)
        replayed = iter(_Replay.apply(self, *self.weights))
        passed = iter(t for t, r in zip(tensors_in(self.output), self.replayed) if not r)
        flags = iter(self.replayed)
        return map_tensors(lambda t: next(replayed) if next(flags) else next(passed), self.output)


class _Replay(torch.autograd.Function):
    """Forward: the forward graph's replay -> its outputs. Backward: the incoming gradients into the backward
    graph's inputs, its replay, and each weight's gradient set as its `.grad`. The weights are the Function's
    inputs only so that autograd calls this backward; their gradients do not go through autograd."""

    @staticmethod
    def forward(ctx, graph: _StepGraph, *weights):
        ctx.graph = graph
        graph.fwd.replay()
        outputs = [t.detach() for t in graph.outputs]
        ctx.mark_non_differentiable(*[t for t, d in zip(outputs, graph.differentiable) if not d])
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        graph = ctx.graph
        incoming = [g for g, d in zip(grads, graph.differentiable) if d]
        for static, g in zip(graph.grad_outputs, incoming):
            if g is None:  # an output no loss used
                static.zero_()
            else:
                static.copy_(g)
        graph.bwd.replay()
        for weight, grad in graph.grads:
            weight.grad = grad if weight.grad is None else weight.grad + grad
        return (None,) * (1 + len(graph.weights))


def _flat_inputs(images: Tensor, mask: Optional[Tensor], queries: Optional[QueryGroup]) -> list:
    """[images, mask, (queries' position, content, boxes)]: None where absent."""
    return [images, mask] + ([] if queries is None else [queries.position, queries.content, queries.boxes])


@contextlib.contextmanager
def _no_autocast():
    """Autocast off on either device (an eager step's backward runs outside it)."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        yield


def _running_statistics(model: nn.Module) -> list:
    """(buffer, saved copy) of every batch norm statistic that a training forward updates."""
    return [(b, b.clone()) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def _restore(saved: list) -> None:
    for buffer, copy in saved:
        buffer.copy_(copy)
