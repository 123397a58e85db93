"""Orchestration overhead per trial: the scheduler (Ray task, queue, MLflow, store) against a plain loop.

A dozen tiny trials (1 epoch on 8 images, a tiny Conditional DETR) run twice: in a plain Python loop calling
trainers.engine.run_trial, and through scheduler.run_experiment one at a time (max_concurrent 1, so the
two are comparable). Per trial it prints
  dispatch  submission -> first training step, minus the same in the plain loop (call -> first step)
  gap       end of one trial -> first step of the next, minus the same in the plain loop
and the mean extra wall time per trial. Target: <= 2 s per trial. The one-off costs (Ray start, MLflow
database creation) are printed apart; they are paid once per command, not per trial.

    .venv/bin/python benchmarks/orchestration.py [--trials 12]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

from orchestrator import scheduler
from orchestrator.plan import build_plan
from orchestrator.spec import parse_spec
from trainers.data.synthetic import make_synthetic
from trainers.engine import run_trial

SPEC = """name: overhead
runtime: {{data_workers: 0}}
data: {{format: coco, root: {root},
       augment: {{scales: [64], max_size: 64, crop: false, test_size: 64}}}}
student:
  model: {{family: conditional_detr, backbone: resnet18, encoder_layers: 1, decoder_layers: 1, num_queries: 10,
          hidden_dim: 64, num_heads: 4, ffn_dim: 128}}
  schedule: {{epochs: 1, batch_size: 4}}
seeds: {seeds}
resources: {{cpus_per_trial: 1, max_concurrent: 1}}
"""


def plain_loop(plan, workdir: Path) -> list[dict]:
    """The same trials, called one after another in this process: what orchestration is measured against."""
    times = []
    for node in plan.nodes.values():
        stamp = {"start": time.time()}

        def log(line: str, stamp=stamp) -> None:
            if "step" in line and "first_step" not in stamp:
                stamp["first_step"] = time.time()
        run_trial(node.config, workdir / node.hash, log=log)
        stamp["end"] = time.time()
        times.append(stamp)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_synthetic(tmp / "data", train=8, val=4, seed=0, image_size=64)
        spec = parse_spec(SPEC.format(root=tmp / "data", seeds=list(range(args.trials))))

        t0 = time.time()
        scheduler.start_ray()
        ray_start = time.time() - t0
        t0 = time.time()
        scheduler.quiet_logging()
        scheduler.Tracker("warm-up", f"sqlite:///{tmp / 'mlflow.db'}")  # creates the database (migrations)
        mlflow_start = time.time() - t0

        plain_loop(build_plan(spec, tmp / "warm"), tmp / "warm")  # imports and first-call costs, not measured
        plain = plain_loop(build_plan(spec, tmp / "plain"), tmp / "plain")

        options = scheduler.RunOptions(store=tmp / "runs", tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                                       results_dir=tmp / "results", out=io.StringIO(), live=False)
        outcome = scheduler.run_experiment(spec, options)
        assert outcome.exit_code == 0, options.out.getvalue()
        states = sorted(outcome.states.values(), key=lambda s: s.submitted_at)

    print(f"one-off: Ray start {ray_start:.1f} s, MLflow database creation {mlflow_start:.1f} s")
    print(f"{'trial':>5} {'plain: call->step':>18} {'ray: submit->step':>18} {'dispatch +':>11} "
          f"{'plain gap':>10} {'ray gap':>8} {'gap +':>7}")
    dispatch, gaps = [], []
    for i, (p, s) in enumerate(zip(plain, states)):
        plain_start, ray_start_step = p["first_step"] - p["start"], s.first_step_at - s.submitted_at
        dispatch.append(ray_start_step - plain_start)
        line = f"{i:>5} {plain_start:>17.2f}s {ray_start_step:>17.2f}s {dispatch[-1]:>+10.2f}s"
        if i:
            plain_gap = p["first_step"] - plain[i - 1]["end"]
            ray_gap = s.first_step_at - states[i - 1].finished_at
            gaps.append(ray_gap - plain_gap)
            line += f" {plain_gap:>9.2f}s {ray_gap:>7.2f}s {gaps[-1]:>+6.2f}s"
        print(line)
    plain_total = plain[-1]["end"] - plain[0]["start"]
    ray_total = states[-1].ended_at - states[0].submitted_at
    per_trial = (ray_total - plain_total) / len(plain)
    print(f"median extra dispatch {statistics.median(dispatch):.2f} s, median extra gap "
          f"{statistics.median(gaps):.2f} s" if gaps else "")
    print(f"total: plain loop {plain_total:.1f} s, scheduler {ray_total:.1f} s for {len(plain)} trials -> "
          f"{per_trial:+.2f} s per trial (target <= 2 s): {'OK' if per_trial <= 2 else 'OVER'}")
    scheduler.ray.shutdown()
    sys.exit(0 if per_trial <= 2 else 1)


if __name__ == "__main__":
    main()
