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
"""
import argparse
import statistics
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[4, 4096, 32768])
    ap.add_argument("--ops", type=int, default=4000, help="operator pairs (mul, add) per chain")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)  # the CPU's compute stays on one core per thread
    for size in args.sizes:
        runs = [measure(torch, size, args.device, args.ops) for _ in range(args.repeats)]
        us, speedups = statistics.median(r[0] for r in runs), sorted(r[1] for r in runs)
        print(f"{args.device} size {size:6d}: {us:5.1f} us an operator, two threads' speedup "
              f"{statistics.median(speedups):.2f}x (range {speedups[0]:.2f}-{speedups[-1]:.2f})", flush=True)


if __name__ == "__main__":
    main()
