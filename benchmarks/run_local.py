"""Run a spec's trials on one machine without Ray or MLflow: a lent GPU host has neither.

    python benchmarks/run_local.py experiments/synthetic_kd.yaml --parallel 6 --store runs --json out.json

The same plan as `detrdistill run` (plan.build_plan: teachers deduplicated and trained first, every trial in
its content-addressed store folder, result.json written last), executed by a pool of worker processes that
share the machine's GPU. A later `detrdistill run` on the same store reuses every finished trial. At the end:
one line per table cell, the metrics averaged over seeds (mean +- sample std), and the teacher's.
"""
import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from orchestrator.plan import build_plan, read_result
from orchestrator.spec import load_spec
from orchestrator.store_trial import train_in_store

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def train_node(node_hash: str, config_json: dict, workdir: str, threads: int) -> dict:
    """One worker process: train a trial in its store folder (as the scheduler's Ray task does), printing
    each epoch."""
    import torch
    torch.set_num_threads(threads)
    config_json = {**config_json, "runtime": {**config_json.get("runtime", {}), "threads": threads}}
    name, t0 = config_json["name"], time.time()

    def on_event(kind, payload):
        if kind == "epoch":
            shown = " ".join(f"{k} {payload[k]:.4f}" for k in ("train/loss", "AP", "AP50") if k in payload)
            print(f"  [{name}] epoch {payload['epoch']} {shown} ({time.time() - t0:.0f} s)", flush=True)
    result = train_in_store(node_hash, config_json, workdir, on_event)
    return {**result, "seconds": time.time() - t0}


def _run(args):
    try:
        return args[0], train_node(*args), None
    except BaseException as e:  # a failed trial is reported, the others go on
        return args[0], None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"


def execute(plan, parallel: int, threads: int) -> dict[str, dict]:
    """Run every unfinished node, teachers before their students, `parallel` at a time."""
    done = {h: read_result(plan.workdir(h)) for h in plan.finished()}
    failed: dict[str, str] = {}
    # spawn: CUDA cannot be used in forked children; executor workers (unlike Pool's) may have DataLoader workers
    with ProcessPoolExecutor(parallel, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        pending = {}
        while True:
            blocked = {h for h, n in plan.nodes.items() if n.needs in failed}
            for h in blocked - failed.keys():
                failed[h] = f"its teacher failed"
            for node in plan.ready(done.keys() | failed.keys(), pending.keys()):
                if len(pending) >= parallel:
                    break
                print(f"start {node.kind} {node.name} ({node.hash})", flush=True)
                pending[node.hash] = pool.submit(
                    _run, (node.hash, node.config.model_dump(mode="json"), str(plan.workdir(node.hash)), threads))
            if not pending:
                break
            time.sleep(0.5)
            for h in [h for h, r in pending.items() if r.done()]:
                _, result, error = pending.pop(h).result()
                if error:
                    failed[h] = error
                    print(f"FAILED {plan.nodes[h].name} ({h}): {error}", flush=True)
                else:
                    done[h] = result
                    print(f"done {plan.nodes[h].name}: AP {result['metrics']['AP']:.4f} "
                          f"({result['seconds']:.0f} s)", flush=True)
    return done


def summarize(plan, done: dict) -> list[dict]:
    """Per table cell (seeds averaged): mean and sample std of each metric, and the seeds' values."""
    groups: dict[str, dict] = {}
    for h, node in plan.nodes.items():
        if node.kind == "teacher":
            groups[f"teacher {node.name}"] = {"cell": {"teacher": node.name}, "runs": [done.get(h)]}
        for cell in node.cells:
            coords = {k: v for k, v in cell.items() if k != "seed"}
            key = json.dumps(coords, sort_keys=True)
            groups.setdefault(key, {"cell": coords, "runs": []})["runs"].append(done.get(h))
    rows = []
    for g in groups.values():
        runs = [r for r in g["runs"] if r is not None]
        row = {"cell": g["cell"], "n": len(runs), "of": len(g["runs"])}
        for m in METRICS:
            values = [r["metrics"][m] for r in runs]
            if values:
                row[m] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                          "values": values}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value")
    ap.add_argument("--store", default="runs", help="trial store (default runs/, as detrdistill run)")
    ap.add_argument("--parallel", type=int, default=1, help="trials at once")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per trial (default cpus/parallel)")
    ap.add_argument("--json", help="write the summary (and every trial's result) here")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec, args.set)
    plan = build_plan(spec, args.store)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    t0 = time.time()
    print(f"{spec.name}: {len(plan.nodes)} trials ({len(plan.finished())} already finished), {args.parallel} at "
          f"a time, {threads} threads each", flush=True)
    done = execute(plan, args.parallel, threads)
    rows = summarize(plan, done)
    print(f"\n{spec.name}: {len(done)}/{len(plan.nodes)} trials finished in {time.time() - t0:.0f} s")
    for row in rows:
        shown = "  ".join(f"{m} {row[m]['mean']:.4f}+-{row[m]['std']:.4f}" for m in ("AP", "AP50", "AP75") if m in row)
        print(f"{json.dumps(row['cell']):60} n={row['n']}/{row['of']}  {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec.name, "rows": rows, "seconds": time.time() - t0,
                                               "trials": done}, indent=1, default=str))
    return 0 if len(done) == len(plan.nodes) else 1


if __name__ == "__main__":
    sys.exit(main())
