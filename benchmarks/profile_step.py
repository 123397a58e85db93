"""Where a train step's time goes on a GPU: how busy the GPU is, and its costliest kernels, per dtype.

    python benchmarks/profile_step.py --scale paper --families conditional_detr adamixer --dtypes fp32 bf16
    python benchmarks/profile_step.py --mode distill_ahead --families conditional_detr deformable_detr --dtypes fp32

A step (built as benchmarks/step.py builds it) is timed, then profiled (torch.profiler, CPU and CUDA). Per
configuration: the wall time of a step, the time its kernels kept the GPU busy (the union of their intervals,
so that concurrent kernels count once), busy / wall (a step well below 1 waits on its host: Python, kernel
launches, the CPU matching), the kernels and the aten casts (`_to_copy`) a step launches, and the kernels that
take most GPU time, and the operators that take most host time. Where bf16 is not faster than fp32, this says
whether the GPU or the host holds it back. --mode: a step.py step other than the student's, e.g. the
DETRDistill step run ahead as the engine runs it on CUDA (`distill_ahead`): where its host still waits
(cudaStreamSynchronize, cudaEventSynchronize, aten::_local_scalar_dense in the host list) and how busy it keeps
the GPU against the student step's.
"""
import argparse
import statistics
import time

import step as step_bench


def _busy_us(events) -> float:
    """Length of the union of the kernels' [start, end] intervals, in microseconds."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, cur_start, cur_end = 0.0, None, None
    for s, e in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def profile(family, dtype, scale, steps, warmup, top, mode="student"):
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from torch.autograd import DeviceType
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    run = step_bench._ours(family, step_bench.SCALES[scale], device, dtype, mode)
    for _ in range(warmup):
        run()
    step_bench._sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        step_bench._sync(device)
        times.append(time.perf_counter() - t0)
    wall = statistics.median(times)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        for _ in range(steps):
            run()
        step_bench._sync(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    casts = sum(1 for e in events if e.name == "aten::_to_copy" and e.device_type == DeviceType.CPU)
    busy = _busy_us(kernels) / 1e6 / steps if kernels else float("nan")
    by_name = {}
    for e in kernels:
        t, n = by_name.get(e.name, (0.0, 0))
        by_name[e.name] = (t + e.time_range.elapsed_us(), n + 1)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    # the host's side: operators (and CUDA runtime calls) by their own CPU time, waits for the GPU included
    host = sorted((a for a in prof.key_averages() if a.self_cpu_time_total > 0), key=lambda a: -a.self_cpu_time_total)
    return {"wall_s": wall, "busy_s": busy, "kernels": len(kernels) / steps, "casts": casts / steps,
            "top": [(name[:90], t / 1e3 / steps, n / steps) for name, (t, n) in ranked],
            # every host operator, most own CPU time first: (ms, calls) per step
            "host": {a.key[:90]: (a.self_cpu_time_total / 1e3 / steps, a.count / steps) for a in host},
            "host_total_ms": sum(a.self_cpu_time_total for a in host) / 1e3 / steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="paper", choices=list(step_bench.SCALES))
    ap.add_argument("--families", nargs="+", default=["conditional_detr", "adamixer"], choices=step_bench.FAMILIES)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=step_bench.DTYPES)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--mode", default="student", choices=["student", "distill", "distill_ahead", "distill_thread"],
                    help="which step (step.py's modes)")
    args = ap.parse_args()
    print(f"step: {args.mode}")
    print(f"{'family':18} {'dtype':10} {'wall s':>8} {'busy s':>8} {'busy/wall':>9} {'kernels':>8} {'casts':>6}")
    details = []
    for family in args.families:
        for dtype in args.dtypes:
            try:
                r = profile(family, dtype, args.scale, args.steps, args.warmup, args.top, args.mode)
            except Exception as e:  # keep the other configurations' numbers
                print(f"{family:18} {dtype:10} failed: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            print(f"{family:18} {dtype:10} {r['wall_s']:8.4f} {r['busy_s']:8.4f} {r['busy_s'] / r['wall_s']:9.2f} "
                  f"{r['kernels']:8.0f} {r['casts']:6.0f}", flush=True)
            details.append((family, dtype, r))
    for family, dtype, r in details:
        print(f"\n{family} {dtype}: top kernels (ms per step, launches per step)")
        for name, ms, n in r["top"]:
            print(f"  {ms:8.3f} {n:5.0f}  {name}")
        print(f"{family} {dtype}: top host operators by own CPU time (ms per step, calls per step; "
              f"all operators: {r['host_total_ms']:.1f} ms, under the profiler)")
        for name, (ms, n) in list(r["host"].items())[:args.top]:
            print(f"  {ms:8.3f} {n:5.0f}  {name}")
    _host_differences(details, args.top)


def _host_differences(details, top):
    """Per family and dtype other than fp32: the operators whose host time grew most against fp32's (where a
    bf16 step that waits on its host loses its time)."""
    fp32 = {family: r for family, dtype, r in details if dtype == "fp32"}
    for family, dtype, r in details:
        if dtype == "fp32" or family not in fp32:
            continue
        base = fp32[family]["host"]
        grown = sorted(((ms - base.get(name, (0.0, 0))[0], n - base.get(name, (0.0, 0))[1], name)
                        for name, (ms, n) in r["host"].items()), reverse=True)[:top]
        print(f"\n{family} {dtype} - fp32: host operators whose own CPU time grew most (ms per step, calls per "
              f"step; all operators: {r['host_total_ms'] - fp32[family]['host_total_ms']:+.1f} ms)")
        for ms, n, name in grown:
            print(f"  {ms:+8.3f} {n:+6.0f}  {name}")


if __name__ == "__main__":
    main()
