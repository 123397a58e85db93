"""Exact rectangular linear sum assignment for many independent problems at once.

The kernel is scipy's own algorithm (`scipy.optimize.linear_sum_assignment`: shortest augmenting paths
with dual variables, Crouse 2016, one row added per augmentation; a tall matrix is solved transposed)
with the same float64 operations in the same order and the same tie-breaking, so on any finite input it
returns what scipy returns, not merely an assignment of equal cost. It is compiled with numba (a
branch-free scan, see `_lsap_kernel`), releases the GIL, and `solve_many` runs the problems on a pool of
threads, largest first, each thread taking the next unsolved problem. It is kept only while it beats scipy
on a thread pool of the same size by a wide margin (scipy >= 1.12 releases the GIL too):
benchmarks/matching.py measures that ratio.

numba is optional: `available()` says whether it imports; callers fall back to scipy when it does not.
Threads: the caller says how many (`num_threads`); no numba threading layer is involved (plain Python
threads running a nogil kernel), so calls from several threads at once and forked processes are safe.
The kernel (two specialisations: float64 costs, which is what scipy converts every input to, and float32,
a step's own, read as float64 in every sum) is compiled on first use and cached on disk (numba's
cache=True), so only the first process pays the compile; later ones load it.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_numba = None  # imported on first use (0.3 s), not when this module is imported


def available() -> bool:
    """Whether numba imports (else callers use scipy)."""
    global _numba
    if _numba is None:
        try:
            import numba
            _numba = numba
        except ImportError:  # pragma: no cover - exercised only where numba is missing
            _numba = False
    return _numba is not False


def _lsap_kernel(cost, rows_out, cols_out):
    """cost [R, C] float64 or float32, C-contiguous -> rows_out, cols_out int64 [min(R, C)]; False (and
    nothing written) if the cost has a NaN or an inf. A float32 cost's values enter every sum as float64 (numba
    promotes them first), exactly what scipy computes on the float64 copy it makes of a float32 input.

    scipy/optimize/rectangular_lsap/rectangular_lsap.cpp (solve + augmenting_path), computing every float64
    value with the same operations in the same order and breaking ties by the same rule and scan order, so
    its result is scipy's. Three changes make the scan faster (and leave the values alone):
    - scipy updates path[j] (and spc[j]) only when a scanned row lowers spc[j]: a data-dependent branch the
      CPU mispredicts. Here spc[j] = min(spc[j], r) is branch-free, and path[j] is recomputed afterwards,
      only for the columns of the augmenting path: the row whose scan last lowered spc[j] is the first
      scanned row (of those that saw j) whose value r equals spc[j], since a later equal r does not replace
      it; r is recomputed with the same operands (u and v do not change during a search).
    - the row and column sets SR / SC are the lists of scanned rows / removed columns (the duals of only
      those are updated: O(path) per row rather than O(R + C)).
    - `remaining` holds unsigned indices (numba drops negative-index handling from the hot loop), and the
      "lowest, or equal and free" test is nested under one `s <= lowest` comparison.
    """
    nr0, nc0 = cost.shape
    for i in range(nr0):
        for j in range(nc0):
            if not np.isfinite(cost[i, j]):
                return False
    if nr0 == 0 or nc0 == 0:
        return True
    transpose = nc0 < nr0  # tall matrices are solved transposed, as scipy does
    if transpose:
        nr, nc = nc0, nr0
        c = np.empty((nr, nc), dtype=cost.dtype)
        for i in range(nr0):
            for j in range(nc0):
                c[j, i] = cost[i, j]
    else:
        nr, nc = nr0, nc0
        c = cost

    u = np.zeros(nr, dtype=np.float64)
    v = np.zeros(nc, dtype=np.float64)
    spc = np.empty(nc, dtype=np.float64)         # shortestPathCosts
    path = np.full(nc, -1, dtype=np.int64)
    col4row = np.full(nr, -1, dtype=np.int64)
    row4col = np.full(nc, -1, dtype=np.int64)
    remaining = np.empty(nc, dtype=np.uint64)
    tree_row = np.empty(nr, dtype=np.int64)      # k-th row scanned in this search (scipy's SR, in order)
    tree_min = np.empty(nr, dtype=np.float64)    # minVal when it was scanned
    removed = np.empty(nr, dtype=np.int64)       # column chosen after the k-th scan (scipy's SC, in order)

    for cur_row in range(nr):
        # augmenting_path: Dijkstra from cur_row over reduced costs until a free column is reached
        min_val = 0.0
        num_remaining = nc
        for it in range(nc):
            remaining[it] = nc - it - 1  # reverse order: a constant matrix gives the identity (scipy #11602)
        spc[:] = np.inf
        i = cur_row
        sink = -1
        n_scan = 0
        while sink == -1:
            tree_row[n_scan] = i
            tree_min[n_scan] = min_val
            ui = u[i]
            crow = c[i]
            index = -1
            lowest = np.inf
            for it in range(num_remaining):
                jj = remaining[it]
                r = min_val + crow[jj] - ui - v[jj]
                s = spc[jj]
                s = r if r < s else s
                spc[jj] = s
                # the lowest; among equal lowest prefer a free column (it ends the path), as scipy does
                if s <= lowest:
                    if s < lowest or row4col[jj] == -1:
                        lowest = s
                        index = it
            min_val = lowest
            if min_val == np.inf:  # infeasible; cannot happen for finite costs
                raise ValueError("infeasible cost matrix")
            j = np.int64(remaining[index])
            removed[n_scan] = j
            n_scan += 1
            if row4col[j] == -1:
                sink = j
            else:
                i = row4col[j]
            num_remaining -= 1
            remaining[index] = remaining[num_remaining]

        # path[j] of the columns on the augmenting path (before the duals change: same operands as the scan)
        j = sink
        k_last = n_scan - 1  # the last scan that saw column j
        while True:
            sj = spc[j]
            vj = v[j]
            i = -1
            for k in range(k_last + 1):
                t = tree_row[k]
                if tree_min[k] + c[t, j] - u[t] - vj == sj:
                    i = t
                    break
            path[j] = i
            if i == cur_row:
                break
            j = col4row[i]
            for k in range(n_scan):
                if removed[k] == j:
                    k_last = k
                    break

        # update dual variables
        u[cur_row] += min_val
        for k in range(1, n_scan):
            t = tree_row[k]
            u[t] += min_val - spc[col4row[t]]
        for k in range(n_scan):
            j = removed[k]
            v[j] -= min_val - spc[j]

        # augment the previous solution along the path
        j = sink
        while True:
            i = path[j]
            row4col[j] = i
            j, col4row[i] = col4row[i], j
            if i == cur_row:
                break

    if transpose:
        # original rows ascending: col4row holds distinct original rows, so invert it
        owner = np.full(nc, -1, dtype=np.int64)
        for k in range(nr):
            owner[col4row[k]] = k
        n = 0
        for orig_row in range(nc):
            if owner[orig_row] >= 0:
                rows_out[n] = orig_row
                cols_out[n] = owner[orig_row]
                n += 1
    else:
        for k in range(nr):
            rows_out[k] = k
            cols_out[k] = col4row[k]
    return True


_compiled = None
_compile_lock = threading.Lock()


def _kernel():
    """The jitted kernel (compiled, or loaded from numba's cache, on its first call)."""
    global _compiled
    if _compiled is None:
        with _compile_lock:
            if _compiled is None:
                if not available():
                    raise ImportError("trainers.lsap needs numba")
                _compiled = _numba.njit(nogil=True, cache=True)(_lsap_kernel)
    return _compiled


def warm_up() -> float:
    """Compile (or load from numba's cache) the kernel now, for float64 and float32 costs, not inside a timed
    step; returns seconds."""
    t0 = time.perf_counter()
    solve(np.zeros((2, 3)))
    solve(np.zeros((2, 3), dtype=np.float32))
    return time.perf_counter() - t0


def _prepare(cost) -> np.ndarray:
    """C-contiguous float32 or float64 as given (the kernel reads float32 as float64, the exact conversion
    scipy applies to its input), anything else as float64: a step's float32 costs are solved without a
    converted copy each, so a solver thread needs the GIL only to call the kernel and after it returns (on a
    GPU host the step's own thread holds the GIL between its operators, and each wait for it may last the
    interpreter's switch interval)."""
    cost = np.asarray(cost)
    return np.ascontiguousarray(cost, dtype=cost.dtype if cost.dtype in (np.float32, np.float64) else np.float64)


def solve(cost) -> tuple[np.ndarray, np.ndarray]:
    """One 2-D problem: the same (row_idx, col_idx), as int64, as scipy.optimize.linear_sum_assignment."""
    result = solve_many([cost])[0]
    if result is None:
        raise ValueError("cost matrix contains NaN or inf")
    return result


_pool = None
_pool_pid = None
_pool_size = 0
_pool_lock = threading.Lock()


def _get_pool(workers: int) -> ThreadPoolExecutor:
    """The process-wide helper threads (at least `workers`), rebuilt after a fork (threads do not
    survive one) and grown when more are asked for; never shrunk, a call uses only what it needs."""
    global _pool, _pool_pid, _pool_size
    with _pool_lock:
        if _pool_pid != os.getpid() or _pool_size < workers:
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)  # work already submitted still runs
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lsap")
            _pool_pid, _pool_size = os.getpid(), workers
        return _pool


# A thread is worth handing work to (~20-50 us) only if it gets at least about this much work
# (R * C * min(R, C); a 300 x 300 problem is 27e6, ~2 ms; 1e6 is ~0.1 ms).
WORK_PER_THREAD = 1_000_000


def solve_many(costs: list, num_threads: int = 1) -> list:
    """Every 2-D problem of `costs`, on up to `num_threads` threads (the caller's thread included).

    Result i is exactly scipy.optimize.linear_sum_assignment(costs[i]) as int64 arrays, or None if
    costs[i] has a NaN or inf (the caller decides how to report it). Empty problems give empty arrays.
    """
    shapes = [np.shape(c) for c in costs]
    if any(len(sh) != 2 for sh in shapes):
        raise ValueError("every cost matrix must be 2-D")
    out = [(np.empty(min(sh), dtype=np.int64), np.empty(min(sh), dtype=np.int64)) for sh in shapes]
    kernel = _kernel()
    ok = [True] * len(costs)
    # largest first (work ~ rows * cols * min(rows, cols)), then each thread takes the next one left:
    # the float64 conversion, the finiteness check and the solve all run on the worker threads
    order = sorted(range(len(costs)), key=lambda i: -shapes[i][0] * shapes[i][1] * min(shapes[i]))

    tickets = itertools.count()  # next() on a count is atomic under the GIL

    def drain():
        while True:
            t = next(tickets)
            if t >= len(order):
                return
            i = order[t]
            ok[i] = kernel(_prepare(costs[i]), *out[i])

    work = sum(sh[0] * sh[1] * min(sh) for sh in shapes)
    threads = max(1, min(int(num_threads), sum(1 for sh in shapes if min(sh) > 0), work // WORK_PER_THREAD))
    futures = [_get_pool(threads - 1).submit(drain) for _ in range(threads - 1)] if threads > 1 else []
    drain()
    for f in futures:
        f.result()
    return [o if good else None for o, good in zip(out, ok)]
