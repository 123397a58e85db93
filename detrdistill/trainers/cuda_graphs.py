"""What the CUDA-graph wrappers share (graphed_model.GraphedModel, distill/teacher_graph.GraphedTeacher): one
graph per input key, captured the second time the key comes, replayed after; at most `max_graphs` kept, the
least recently used dropped first, all in one memory pool of the wrapper's own; a capture that fails warns once
and leaves the wrapped module eager from then on.

The second time, because DETR's multi-scale batches mostly come in shapes seen once, and a capture costs about
two eager calls (a warm-up on the capture stream, the capture itself); the first call is eager and makes what a
capture must find made (a shape's cached constants, cuDNN's choices).
"""
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import nn

# One capture at a time in the process: with overlap_teacher "thread" the teacher's forward may be captured on the
# helper thread while this one captures the student's, and a capture's start (a device-wide synchronisation, the
# allocator's cache emptied) is not for the middle of another's.
CAPTURE_LOCK = threading.Lock()


class ShapeGraphs(nn.Module):
    """Base of a wrapper: `self.graphs` (key -> captured graph), `self.seen` (keys run once eagerly),
    `self.failed` (why a capture failed, or None)."""

    what = "the call"  # for the warning of a failed capture

    def __init__(self, max_graphs: int):
        super().__init__()
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.seen: set = set()
        self.failed: Optional[str] = None
        self._pool = None
        self._stream = None

    def _graph_for(self, key, device: torch.device, capture: Callable):
        """The graph for `key`, capturing it now (`capture(pool, stream)`) if the key came before; None where the
        call is to run eagerly (the key's first time, or captures failed)."""
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return graph
        if key not in self.seen:
            self.seen.add(key)
            return None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device)
        try:
            with CAPTURE_LOCK:
                graph = capture(self._pool, self._stream)
        except Exception as e:  # an operator capture does not allow: eager from now on, said once
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"{self.what}: capture failed ({self.failed}); it runs without CUDA graphs",
                          RuntimeWarning, stacklevel=4)
            return None
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)  # its memory goes back to the pool
        return graph

    def reset(self) -> None:
        """Drop every graph: after changing the wrapped module's settings (e.g. its LayerNorms' output dtype) or
        moving its weights, which the graphs read where they were at capture."""
        self.graphs.clear()
        self.seen.clear()


def autocast_setting() -> dict:
    """The caller's CUDA autocast setting with its cast cache off, for a capture: a cast cached during capture
    would live in the graph's pool."""
    return dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                cache_enabled=False)
