"""The parallel assignment solver (trainers.lsap) against scipy, brute force and the contract of
solve_assignments. The kernel mirrors scipy's algorithm operation for operation, so its assignments are
asserted equal to scipy's everywhere, ties included (integer costs); the total cost is checked as well."""
import itertools
import multiprocessing
import threading

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

pytest.importorskip("numba")

from trainers import lsap  # noqa: E402
from trainers.matching import solve_assignments  # noqa: E402


def _shapes():
    rng = np.random.default_rng(0)
    shapes = [(0, 0), (0, 5), (5, 0), (1, 1), (1, 7), (7, 1)]
    for _ in range(60):
        r = int(rng.integers(1, 61))
        shapes += [(r, r), (r, int(rng.integers(r, 61))), (int(rng.integers(r, 61)), r)]
    return shapes


def _assert_same_as_scipy(cost, rows, cols):
    r, c = linear_sum_assignment(cost)
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert np.all(np.diff(rows) > 0)
    assert cost[rows, cols].sum() == cost[r, c].sum()  # same total (exact: same pairs, summed in order)
    np.testing.assert_array_equal(rows, r)
    np.testing.assert_array_equal(cols, c)


@pytest.mark.parametrize("kind", ["float64", "float32", "int_ties", "int_ties_wide_range"])
def test_random_problems_equal_scipy(kind):
    rng = np.random.default_rng({"float64": 1, "float32": 2, "int_ties": 3, "int_ties_wide_range": 4}[kind])
    costs = []
    for shape in _shapes():
        if kind == "float64":
            costs.append(rng.normal(size=shape))
        elif kind == "float32":
            costs.append(rng.random(shape, dtype=np.float32) * 10)
        elif kind == "int_ties":  # many equal costs: many optimal assignments
            costs.append(rng.integers(0, 3, shape).astype(np.float64))
        else:
            costs.append(rng.integers(-50, 50, shape).astype(np.float32))
    for cost, (rows, cols) in zip(costs, lsap.solve_many(costs, num_threads=2)):
        _assert_same_as_scipy(cost, rows, cols)


def test_constant_and_degenerate_matrices():
    for cost in [np.zeros((5, 5)), np.ones((3, 6)), np.full((6, 3), 2.5), np.eye(4), -np.eye(4),
                 np.array([[1e300, -1e300], [0.0, 5e-324]]), np.arange(12.0).reshape(3, 4) ** 2]:
        _assert_same_as_scipy(cost, *lsap.solve(cost))


@pytest.mark.parametrize("shape", [(r, c) for r in range(1, 5) for c in range(1, 5)])
def test_brute_force_tiny(shape):
    rng = np.random.default_rng(sum(shape) * 7 + shape[0])
    for _ in range(20):
        cost = rng.integers(0, 4, shape).astype(np.float64) if rng.random() < 0.5 else rng.random(shape)
        rows, cols = lsap.solve(cost)
        r, c = shape
        if r <= c:
            best = min(sum(cost[i, p[i]] for i in range(r)) for p in itertools.permutations(range(c), r))
        else:
            best = min(sum(cost[p[j], j] for j in range(c)) for p in itertools.permutations(range(r), c))
        assert len(rows) == min(shape) and len(set(cols.tolist())) == len(cols)
        assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-12)


def test_paper_shaped_batch_equals_serial_scipy():
    """12 problems of 300 x 300 (B = 2 images x L = 6 layers), float32 like the real costs, plus a tall and
    a wide one and an empty one, through solve_assignments' parallel path."""
    rng = np.random.default_rng(5)
    costs = [rng.normal(size=(300, 300)).astype(np.float32) for _ in range(12)]
    costs += [rng.random((300, 40)), rng.random((40, 300)), np.zeros((300, 0), dtype=np.float32)]
    solved = solve_assignments(costs, num_threads=2, backend="numba")
    auto = solve_assignments(costs, num_threads=2)  # big enough: auto picks the parallel path too
    serial = solve_assignments(costs, backend="scipy")
    for cost, (rows, cols), (ar, ac), (sr, sc) in zip(costs, solved, auto, serial):
        np.testing.assert_array_equal(rows, sr)
        np.testing.assert_array_equal(cols, sc)
        np.testing.assert_array_equal(ar, sr)
        np.testing.assert_array_equal(ac, sc)
        if cost.size:
            _assert_same_as_scipy(cost, rows, cols)


def test_thread_count_does_not_change_results_and_concurrent_calls_are_safe():
    rng = np.random.default_rng(6)
    costs = [rng.random((int(rng.integers(1, 80)), int(rng.integers(1, 80)))) for _ in range(40)]
    reference = lsap.solve_many(costs, num_threads=1)
    for threads in (2, 3, 8):
        for (r, c), (rr, rc) in zip(lsap.solve_many(costs, num_threads=threads), reference):
            np.testing.assert_array_equal(r, rr)
            np.testing.assert_array_equal(c, rc)

    results, errors = {}, []

    def call(k):
        try:
            results[k] = lsap.solve_many(costs, num_threads=2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(3):
        for (r, c), (rr, rc) in zip(results[k], reference):
            np.testing.assert_array_equal(c, rc)


def _child(costs, queue):
    queue.put([c.tolist() for _, c in lsap.solve_many(costs, num_threads=2)])


def test_works_in_a_forked_child_after_the_parent_used_threads():
    rng = np.random.default_rng(7)
    costs = [rng.random((120, 120)) for _ in range(4)]
    expected = [c.tolist() for _, c in lsap.solve_many(costs, num_threads=2)]
    assert lsap._pool_pid is not None  # the parent has a pool now, whose threads the child will not have
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(costs, queue))
    proc.start()
    got = queue.get(timeout=120)
    proc.join(timeout=30)
    assert got == expected


def test_inputs_scipy_accepts():
    """Non-contiguous slices (as the matcher passes), integer and float16 costs, lists."""
    rng = np.random.default_rng(8)
    big = rng.random((2, 3, 50, 40))
    costs = [big[1, 2, :, :17], big[0, 1].T, rng.integers(-5, 5, (9, 7)), rng.random((6, 6)).astype(np.float16),
             [[3.0, 1.0], [1.0, 3.0]]]
    for cost, (rows, cols) in zip(costs, solve_assignments(costs, num_threads=2, backend="numba")):
        _assert_same_as_scipy(np.asarray(cost), rows, cols)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected_naming_the_matrix(bad):
    costs = [np.ones((300, 300)), np.ones((4, 4)), np.ones((5, 3))]
    costs[2][4, 1] = bad
    with pytest.raises(ValueError, match=r"cost matrix 2 \(shape \(5, 3\)\) contains NaN or inf"):
        solve_assignments(costs, num_threads=2, backend="numba")
    with pytest.raises(ValueError, match="NaN or inf"):
        lsap.solve(costs[2])


def test_empty_problems():
    costs = [np.zeros((0, 0)), np.zeros((0, 4), dtype=np.float32), np.zeros((4, 0)), np.ones((2, 2))]
    out = solve_assignments(costs, num_threads=2, backend="numba")
    for cost, (rows, cols) in zip(costs, out):
        assert rows.dtype == cols.dtype == np.int64
        assert len(rows) == len(cols) == min(cost.shape)
    assert solve_assignments([], backend="numba") == []
    with pytest.raises(ValueError, match="2-D"):
        solve_assignments([np.ones(3)], backend="numba")
