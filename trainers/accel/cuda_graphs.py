"""What the CUDA-graph wrappers share (graphed_model.GraphedModel, graphed_teacher.GraphedTeacher): one
graph per input key, captured the second time the key comes, replayed after; at most `max_graphs` kept, the
least recently used dropped first, all in one memory pool of the wrapper's own; a capture that fails, or keys
that vary too much for graphs to pay, warn once and leave the wrapped module eager from then on.

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
    `self.stopped` (why capturing stopped, or None).

    Capturing stops too when keys vary too much for graphs to pay: after `THRASH_CAPTURES` captures with fewer
    than `THRASH_REPLAYS` replays per capture (multi-scale batches cycling through more shapes than
    `max_graphs`), since each capture costs about two eager calls."""

    what = "the call"  # for the warning when capturing stops
    THRASH_CAPTURES = 8
    THRASH_REPLAYS = 4

    def __init__(self, max_graphs: int):
        super().__init__()
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.seen: set = set()
        self.stopped: Optional[str] = None
        self.captures = self.replays = 0
        self._pool = None
        self._stream = None

    @staticmethod
    def capturable(device: torch.device) -> bool:
        """Whether calls on `device` are captured (tests/graph_emulation.py lets the CPU's be)."""
        return device.type == "cuda"

    def _graph_for(self, key, capture: Callable):
        """The graph for `key`, capturing it now (`capture()`) if the key came before; None where the call is to
        run eagerly (the key's first time, or capturing stopped)."""
        if self.stopped is not None:
            return None
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            self.replays += 1
            return graph
        if key not in self.seen:
            self.seen.add(key)
            return None
        if self.captures >= self.THRASH_CAPTURES and self.replays < self.THRASH_REPLAYS * self.captures:
            self._stop(f"input shapes vary too much: {self.captures} captures, {self.replays} replays with at most "
                       f"{self.max_graphs} graphs kept")
            return None
        try:
            with CAPTURE_LOCK:
                graph = capture()
        except Exception as e:  # an operator capture does not allow: eager from now on, said once
            self._stop(f"capture failed: {type(e).__name__}: {e}")
            return None
        self.captures += 1
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)  # its memory goes back to the pool
        return graph

    def _capture_resources(self, device: torch.device) -> tuple:
        """(memory pool, capture stream) of this wrapper's graphs, made on first use."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device)
        return self._pool, self._stream

    def _stop(self, why: str) -> None:
        self.stopped = why
        self.graphs.clear()
        warnings.warn(f"{self.what}: {why}; it runs without CUDA graphs from now on", RuntimeWarning, stacklevel=5)


def input_key(inputs: list) -> tuple:
    """What a graph is captured for: each input's shape, dtype and device (None: absent), and the caller's CUDA
    autocast setting. Not its strides: an input is copied into the graph's own buffer (e.g. the teacher's
    query group, views of one embedding from an eager forward, copies from a replayed one)."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs) + \
        (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))


def autocast_setting() -> dict:
    """The caller's CUDA autocast setting with its cast cache off, for a capture: a cast cached during capture
    would live in the graph's pool."""
    return dict(device_type="cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                cache_enabled=False)
