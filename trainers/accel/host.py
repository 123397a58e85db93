"""The host's side of a GPU step: device values copied to the host without waiting, and work on them done by a
helper thread while this one goes on queueing the step.

Reading a GPU value at once (`.item()`, `.cpu()`) holds the host until the GPU has run everything queued before
it, and a step at batch 2 waits on its host. `host_copies` queues the copies in stream order and says when they
have landed; `start_on_host` runs a function on them on a helper thread (a step's Hungarian assignments, which
the matching and the logits KD term start). Small tensors the other way, host to device, are
`models.constants.host_to_device`.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
from torch import Tensor

_pools: dict[str, ThreadPoolExecutor] = {}
_pid = None


def helper_thread(name: str) -> ThreadPoolExecutor:
    """The process's single-thread executor called `name` (its thread: `{name}_0`), made again after a fork:
    threads do not survive one."""
    global _pid
    if _pid != os.getpid():
        _pools.clear()
        _pid = os.getpid()
    if name not in _pools:
        _pools[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    return _pools[name]


def host_copies(*tensors: Optional[Tensor]) -> tuple[list, Callable[[], None]]:
    """Device tensors (None passes through) copied to the host without blocking -> (host tensors, `landed()`).
    From a GPU the copies go to pinned memory in stream order and `landed()` waits on a CUDA event for them
    (and nothing queued after); read the host tensors only after it. On the CPU they are the tensors, landed."""
    host = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if device.type != "cuda":
        return host, lambda: None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return host, event.synchronize  # releases the GIL while it waits


def start_on_host(solve: Callable, *tensors: Optional[Tensor]) -> Callable[[], object]:
    """Queues one copy of each tensor to the host and returns `wait() -> solve(*host_tensors)`.

    On a GPU the copies are asynchronous and `solve` runs on the helper thread "kd-solve" as soon as they land
    (its jobs in the order started), so the caller goes on queueing GPU work (the teacher's next forward, the
    other loss terms) while the CPU solves, instead of waiting for the GPU, then for the solve: a blocking
    copy would hold the host until the GPU had run everything queued before it. The solvers release the GIL,
    and run with this thread's torch thread count (under OpenMP a thread's own setting). On the CPU it is
    solved in `wait()` (the cores are the solver's and the other terms' alike). Either way an error of the
    solve (a NaN cost) is raised by `wait()`.
    """
    device = next(t.device for t in tensors if t is not None)
    host, landed = host_copies(*tensors)
    if not solve_in_background(device):
        return lambda: solve(*host)
    threads = torch.get_num_threads()

    def job():
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        landed()
        return solve(*host)
    return helper_thread("kd-solve").submit(job).result


def solve_in_background(device: torch.device) -> bool:
    """Where `start_on_host` solves on the helper thread: on a GPU (tests force it on the CPU)."""
    return device.type == "cuda"
