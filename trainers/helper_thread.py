"""One named helper thread per process, for work that runs beside a training step (the KD assignment's solve,
the teacher's forward run ahead)."""
import os
from concurrent.futures import ThreadPoolExecutor

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
