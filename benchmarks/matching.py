"""Hungarian matching speed: solve_assignments (numba, parallel, exact) vs scipy on a thread pool of the same size.

    python benchmarks/matching.py                   # B = 2, 4, 8; L = 6; 300 x 300; torch.get_num_threads()
    python benchmarks/matching.py --threads 16 --reps 9

One "step" = the B x L assignment problems of one training step at paper size (B images, L = 6 decoder
layer pairs, 300 student x 300 teacher queries), all handed to one call, as the KD matching and the
ground-truth matcher do. Two kinds of float32 costs:
  random  uniform random costs;
  kd      the real KD cost (trainers.distill.logits.kd_cost: soft BCE over 91 classes + 5 L1 - 2 GIoU) between
          teacher predictions (mostly confident background, ~7 objects per image) and a noisy, shuffled
          student copy of them, as mid-training.
Each rep times, back to back (so load from other processes hits all alike): scipy's linear_sum_assignment
in a loop; the same on a ThreadPoolExecutor of --threads workers (scipy >= 1.12 releases the GIL while it
solves, so a pool is the fair comparison); and solve_assignments with --threads. Reported: the median over
--reps after a warm-up; every result is checked identical to scipy's. The last line is
`speedup_vs_pooled_scipy: X`, X the geometric mean over every row (every B and cost kind) of pooled scipy's
time over ours: the figure that decides whether the numba solver pays for itself. Before the table, the numba compile time is measured in fresh processes: with an
empty cache (a first run on a machine) and with the cache it left (every later process).
"""
import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers import lsap  # noqa: E402
from trainers.matching import solve_assignments  # noqa: E402

N_CLASSES = 91


def random_costs(rng, n_problems, n):
    return [rng.random((n, n), dtype=np.float32) for _ in range(n_problems)]


def kd_costs(seed, layers, batch, n):
    """[L * B] KD cost matrices built like the real ones (float32, on the CPU)."""
    from trainers.config import LogitsKDConfig
    from trainers.distill.logits import kd_cost
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(layers, batch, n, N_CLASSES, generator=g) * 1.5 - 4.5   # background everywhere
    for b in range(batch):                                                          # ~7 objects per image
        q = torch.randperm(n, generator=g)[:7]
        cls = torch.randint(0, N_CLASSES, (7,), generator=g)
        t_logits[:, b, q, cls] = 3.0 + torch.randn(layers, 7, generator=g)
    cxcy = torch.rand(layers, batch, n, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(layers, batch, n, 2, generator=g) * 0.3 + 0.02
    t_boxes = torch.cat([cxcy, wh], -1)
    perm = torch.argsort(torch.rand(layers, batch, n, generator=g), -1)            # students are shuffled
    s_logits = t_logits.gather(2, perm[..., None].expand_as(t_logits)) + torch.randn(t_logits.shape, generator=g)
    s_boxes = (t_boxes.gather(2, perm[..., None].expand_as(t_boxes))
               + 0.03 * torch.randn(t_boxes.shape, generator=g)).clamp(0.01, 0.99)
    cost = kd_cost(s_logits, s_boxes, t_logits.sigmoid(), t_boxes, LogitsKDConfig())
    return [c.numpy() for c in cost.reshape(layers * batch, n, n)]


def compile_times() -> tuple[float, float]:
    """Seconds to make the kernel callable in a fresh process: with an empty numba cache, then cached."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            "import time; t = time.perf_counter(); from trainers import lsap; lsap.warm_up(); "
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        run = lambda: float(subprocess.run([sys.executable, "-c", code], env=env, check=True,  # noqa: E731
                                           capture_output=True, text=True).stdout.split()[-1])
        return run(), run()


def time_three(costs, pool, threads, reps):
    """Median seconds of (scipy loop, scipy on the pool, solve_assignments), interleaved; checks that all
    three return scipy's assignments."""
    times = [[], [], []]
    for rep in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        serial = [linear_sum_assignment(c) for c in costs]
        t1 = time.perf_counter()
        pooled = list(pool.map(linear_sum_assignment, costs))
        t2 = time.perf_counter()
        ours = solve_assignments(costs, num_threads=threads)
        t3 = time.perf_counter()
        for (r, c), (pr, pc), (sr, sc) in zip(ours, pooled, serial):
            assert all(np.array_equal(a, b) for a, b in ((r, sr), (c, sc), (pr, sr), (pc, sc))), "results differ"
        if rep:
            for i, t in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                times[i].append(t)
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    ap.add_argument("--kinds", nargs="+", default=["random", "kd"], choices=["random", "kd"])
    ap.add_argument("--no-compile-time", action="store_true")
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    if not lsap.available():
        sys.exit("numba is not installed: solve_assignments would be the scipy loop itself")

    print(f"threads: {threads} (os.cpu_count() = {os.cpu_count()}, "
          f"sched_getaffinity = {len(os.sched_getaffinity(0))})")
    if not args.no_compile_time:
        cold, warm = compile_times()
        print(f"kernel ready in a fresh process: {cold:.2f} s compiling (empty numba cache), "
              f"{warm:.2f} s loading the cache")
    print(f"this process: warm-up {lsap.warm_up():.2f} s")

    rng = np.random.default_rng(0)
    print(f"\n{'B':>3} {'problems':>8} {'costs':>7} {'scipy ms':>9} {'pooled ms':>10} {'ours ms':>8} "
          f"{'vs scipy':>9} {'vs pooled':>10}")
    vs_serial, vs_pooled = [], []
    with ThreadPoolExecutor(threads) as pool:
        for batch in args.batches:
            n_problems = batch * args.layers
            for kind in args.kinds:
                costs = (random_costs(rng, n_problems, args.queries) if kind == "random"
                         else kd_costs(batch, args.layers, batch, args.queries))
                t_serial, t_pooled, t_ours = time_three(costs, pool, threads, args.reps)
                vs_serial.append(t_serial / t_ours)
                vs_pooled.append(t_pooled / t_ours)
                print(f"{batch:>3} {n_problems:>8} {kind:>7} {t_serial * 1e3:>9.1f} {t_pooled * 1e3:>10.1f} "
                      f"{t_ours * 1e3:>8.1f} {vs_serial[-1]:>8.2f}x {vs_pooled[-1]:>9.2f}x", flush=True)
    print("results identical to scipy: yes (checked every rep)")
    geomean = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))  # noqa: E731
    print(f"speedup_vs_serial_scipy: {geomean(vs_serial):.2f}")
    print(f"speedup_vs_pooled_scipy: {geomean(vs_pooled):.2f}")


if __name__ == "__main__":
    main()
