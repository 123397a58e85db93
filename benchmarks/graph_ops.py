"""How many operators the host still issues in a step whose forward and backward are replayed from CUDA graphs.

    python benchmarks/graph_ops.py                       # tiny6 (the paper's depths and queries), every family
    python benchmarks/graph_ops.py --families conditional_detr --dtype bf16

At batch 2 a GPU step waits on its host, which issues each operator (README, "The steps wait on the host"). With
schedule.cuda_graph and teacher_cuda_graph the student's forward and backward and the teacher's forward are one
launch each; what is left to the host are the losses, the matching, the graphs' hand-over and the optimizer.
Counted here on the CPU, the graphs emulated (tests/graph_emulation.py: a replay runs the captured operators
again, not counted; each replay is counted as one launch): the aten operators one step dispatches outside its
graphs (views excluded, as benchmarks/step.py's "ops"), eager beside graphed, for the student's step and the
DETRDistill step run ahead (the engine's CUDA mode), after three steps (the shape captured at the second).
"""
import argparse
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
import graph_emulation  # noqa: E402
import step  # noqa: E402


class HostOperators(TorchDispatchMode):
    """Counts the operators dispatched outside graph replays (views and host-side ones excluded) and the
    replays."""

    def __init__(self):
        super().__init__()
        self.ops = self.replays = 0
        self.replaying = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.replaying and not func.is_view and func.overloadpacket.__name__ not in step._NOT_LAUNCHES:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count(family: str, scale: dict, dtype: str, mode: str) -> HostOperators:
    run = step._build_ours(family, scale, torch.device("cpu"), dtype, mode)
    for _ in range(3):  # the first call eager, the second captures
        run()
    counter = HostOperators()
    replay = graph_emulation.EmulatedGraph.replay

    def counted_replay(graph):
        counter.replays += 1
        counter.replaying = True
        try:
            replay(graph)
        finally:
            counter.replaying = False
    graph_emulation.EmulatedGraph.replay = counted_replay
    try:
        with counter:
            run()
    finally:
        graph_emulation.EmulatedGraph.replay = replay
    return counter


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=step.SCALES, default="tiny6")
    ap.add_argument("--families", nargs="+", default=step.FAMILIES, choices=step.FAMILIES)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: the CPU's autocast on bf16 weight copies (CUDA's policy casts otherwise)")
    args = ap.parse_args(argv)
    patch = pytest.MonkeyPatch()
    graph_emulation.emulated_cuda_graphs(patch)
    print(f"scale={args.scale}: aten operators the host dispatches in one step (views excluded), graphs emulated")
    print(f"{'family':18s} {'step':9s} {'eager':>7s} {'graphed':>8s} {'replays':>8s} {'graphed/eager':>14s}")
    try:
        for family in args.families:
            for label, eager_mode, graph_mode in (("student", "student", "student"),
                                                  ("distill", "distill_ahead", "distill_graph")):
                eager = count(family, step.SCALES[args.scale], args.dtype, eager_mode)
                graphed = count(family, step.SCALES[args.scale], f"{args.dtype}-graph", graph_mode)
                print(f"{family:18s} {label:9s} {eager.ops:7d} {graphed.ops:8d} {graphed.replays:8d} "
                      f"{(graphed.ops + graphed.replays) / eager.ops:14.3f}", flush=True)
    finally:
        patch.undo()


if __name__ == "__main__":
    main()
