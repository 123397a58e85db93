"""How many operators the host still issues in a step whose forward and backward are replayed from CUDA graphs.

    python benchmarks/graph_ops.py                       # tiny6 (the paper's depths and queries), every family
    python benchmarks/graph_ops.py --families conditional_detr --dtype bf16

At batch 2 a GPU step waits on its host, which issues each operator (docs/performance.md). With
runtime.cuda_graph and teacher_cuda_graph the student's forward and backward and the teacher's forward are one
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
from torch.utils._python_dispatch import _disable_current_modes

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]
import graph_emulation  # noqa: E402
import step  # noqa: E402


def count(family: str, scale: dict, dtype: str, mode: str) -> tuple[int, int]:
    """-> (operators one step dispatches outside its graphs' replays, replays), after three steps."""
    run = step._build_ours(family, scale, torch.device("cpu"), dtype, mode)
    for _ in range(3):  # the first call eager, the second captures
        run()
    replays = [0]
    replay = graph_emulation.EmulatedGraph.replay

    def uncounted_replay(graph):  # one launch on a GPU: its operators out of step.count_ops' sight
        replays[0] += 1
        with _disable_current_modes():
            replay(graph)
    graph_emulation.EmulatedGraph.replay = uncounted_replay
    try:
        return step.count_ops(run), replays[0]
    finally:
        graph_emulation.EmulatedGraph.replay = replay


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
                eager, _ = count(family, step.SCALES[args.scale], args.dtype, eager_mode)
                graphed, replays = count(family, step.SCALES[args.scale], f"{args.dtype}-graph", graph_mode)
                print(f"{family:18s} {label:9s} {eager:7d} {graphed:8d} {replays:8d} "
                      f"{(graphed + replays) / eager:14.3f}", flush=True)
    finally:
        patch.undo()


if __name__ == "__main__":
    main()
