"""Can two threads issue operators faster than one? The question behind overlap_teacher "thread".

PyTorch releases the GIL while it dispatches an operator, so two threads that issue operators can overlap
that part; each hand-over of the GIL between them costs a thread switch. Two threads each issue the same
chain of elementwise operators (mul, add) on a tensor of --sizes elements, on --device; the time is compared
with one thread issuing both chains. On CUDA the operators are kernel launches and the host's side is what
is timed (the GPU runs them far faster than they are issued).

    python benchmarks/gil_threads.py                      # this CPU
    python benchmarks/gil_threads.py --device cuda        # a GPU host: launches, as a batch-2 step issues them
Prints per size: microseconds an operator, and `speedup` = one thread's time for both chains / two threads',
the median of --repeats measurements (with their range: thread switches make single ones vary by 2x).

--solve: the question behind the KD solve's in-step time (36-53 ms for 12 problems on a 2026-11-27 H200 host,
where ~4 ms were expected on its 16 cores). The step's assignments are solved on helper threads (the parallel
solver's pool, `lsap`, each thread running a GIL-free kernel between short stretches of Python) while the
step's thread dispatches operators, releasing the GIL at each and taking it back at once: a thread that waits
for the GIL may then get it only when the interpreter forces a switch (sys.getswitchinterval(), 5 ms by
default). Times `solve_assignments` on 12 random 300 x 300 problems (float32 views of one array, as the KD's)
on --solve-threads threads alone, and again while this thread dispatches tiny operators on --device, with the
switch interval at 5 ms and at 0.1 ms; and how many operators this thread got through meanwhile (us an
operator).
"""
import argparse
import os
import statistics
import sys
import threading
import time


def chain(torch, size, device, n):
    x = torch.ones(size, device=device)
    for _ in range(n):
        x = x.mul(1.0001).add(0.0001)
    return x


def measure(torch, size, device, n):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    chain(torch, size, device, n // 8)
    sync()
    t0 = time.perf_counter()
    chain(torch, size, device, n)
    chain(torch, size, device, n)
    sync()
    one_thread = time.perf_counter() - t0
    threads = [threading.Thread(target=chain, args=(torch, size, device, n)) for _ in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sync()
    two_threads = time.perf_counter() - t0
    return one_thread / (4 * n) * 1e6, one_thread / two_threads


def solve_beside_dispatch(torch, device, problems, threads, interval):
    """-> (solve seconds, us an operator of this thread meanwhile, or None alone) with the given switch interval;
    interval None: the solve alone."""
    from trainers.matching import solve_assignments
    took = {}

    def solve():
        t0 = time.perf_counter()
        solve_assignments(problems, num_threads=threads)
        took["solve"] = time.perf_counter() - t0
    if interval is None:
        solve()
        return took["solve"], None
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        x, ops = torch.ones(4, device=device), 0
        helper = threading.Thread(target=solve)
        t0 = time.perf_counter()
        helper.start()
        while helper.is_alive():  # as a step's thread queues its kernels while the assignment is solved
            x = x.mul(1.0001).add(0.0001)
            ops += 2
        helper.join()
        return took["solve"], (time.perf_counter() - t0) / max(ops, 1) * 1e6
    finally:
        sys.setswitchinterval(old)


def solve_table(torch, device, threads, repeats):
    import numpy as np
    rng = np.random.default_rng(0)
    problems = list(rng.random((12, 300, 300), dtype=np.float32))  # float32 views of one array, as a step's KD costs
    solve_beside_dispatch(torch, device, problems, threads, None)  # compile / load the kernel
    print(f"12 assignments of 300 x 300 on {threads} solver threads, beside this thread dispatching on {device} "
          f"(median of {repeats}):", flush=True)
    for label, interval in (("alone", None), ("switch 5 ms", 0.005), ("switch 0.1 ms", 0.0001)):
        runs = [solve_beside_dispatch(torch, device, problems, threads, interval) for _ in range(repeats)]
        solve_ms = statistics.median(r[0] for r in runs) * 1e3
        us = "-" if interval is None else f"{statistics.median(r[1] for r in runs):.1f}"
        print(f"  {label:14s} solve {solve_ms:7.1f} ms, dispatch {us} us an operator", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[4, 4096, 32768])
    ap.add_argument("--ops", type=int, default=4000, help="operator pairs (mul, add) per chain")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--solve", action="store_true", help="also: the assignment solve beside a dispatching thread")
    ap.add_argument("--solve-threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)  # the CPU's compute stays on one core per thread
    for size in args.sizes:
        runs = [measure(torch, size, args.device, args.ops) for _ in range(args.repeats)]
        us, speedups = statistics.median(r[0] for r in runs), sorted(r[1] for r in runs)
        print(f"{args.device} size {size:6d}: {us:5.1f} us an operator, two threads' speedup "
              f"{statistics.median(speedups):.2f}x (range {speedups[0]:.2f}-{speedups[-1]:.2f})", flush=True)
    if args.solve:
        solve_table(torch, args.device, args.solve_threads, args.repeats)


if __name__ == "__main__":
    main()
