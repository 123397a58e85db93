"""A distillation teacher's forward run one batch ahead (RuntimeConfig.overlap_teacher).

On a GPU a DETRDistill step ends waiting for its host, which solves the logits term's teacher-student
assignment while the GPU idles. `RunAhead` queues the teacher's forward on the next batch once the step's
assignments are started and before they are collected: the GPU runs it while the host solves, and the next
step uses its output. "thread": a helper thread issues that forward from the start of the step, on a CUDA
stream of its own (`TeacherAhead`), so that the host work of the two forwards shares the host's time (PyTorch
releases the GIL while it dispatches an operator) and their kernels may run side by side.

The losses are the plain objective's, bitwise: the same operators on the same inputs (tests/test_distill.py
-k run_ahead); benchmarks/step.py --distill measures what it saves.
"""
from contextlib import nullcontext

import torch

from trainers.accel.host import helper_thread
from trainers.models.output import tensors_in


def runs_ahead(objective, runtime, device: torch.device) -> bool:
    """Whether an epoch runs `objective`'s teacher ahead (RuntimeConfig `runtime`.overlap_teacher): only for a
    distillation objective with a teacher-student assignment (the logits or the contrastive term), the wait it
    hides; "auto" only on CUDA with data workers, the case it speeds up and changes nothing in."""
    if not getattr(objective, "kd_matching", False) or runtime.overlap_teacher == "off":
        return False
    return runtime.overlap_teacher in ("on", "thread") or (device.type == "cuda" and runtime.data_workers > 0)


class RunAhead:
    """`objective(student, images, mask, targets)` (distill.objective.DistillationLoss) with its teacher's
    forward on `upcoming`, the next call's (images, mask) on the device, queued during this call and used by the
    next. Whoever knows the next batch sets `upcoming` before each call (training.Accelerated.batches); None:
    nothing is queued. thread: the forward issued by the helper thread "teacher-ahead"."""

    def __init__(self, objective, thread: bool = False):
        self.objective = objective
        self.thread = thread
        self.upcoming = None
        self._queued = None  # (images, mask, teacher output or TeacherAhead) computed ahead for the next call

    def __call__(self, student, images, mask, targets) -> dict:
        """The objective's steps (distill.objective), with the teacher's output queued by the previous call if it
        was for these very tensors. The teacher's next forward is queued after every assignment is started
        (thread: at the start): on a GPU nothing here makes the host wait until the losses collect them."""
        objective, upcoming, self.upcoming = self.objective, self.upcoming, None
        t_out = self._teacher_output(images, mask)
        if upcoming is not None and self.thread:  # at once: it runs beside all of this step
            self._queue(*upcoming)
        step = objective.begin(t_out, targets)
        objective.add_student(step, student(images, mask, queries=step.queries), targets)
        if upcoming is not None and not self.thread:  # under the caller's autocast, as every teacher forward
            self._queue(*upcoming)
        return objective.losses(step, images, targets)

    def _teacher_output(self, images, mask):
        """The teacher's output on this batch: the one queued by the previous call if it was for these very
        tensors, else computed now."""
        queued, self._queued = self._queued, None
        if queued is not None:  # a forward on the helper thread finishes first, used or not: the teacher
            # (its modules, its bf16 weight slots) serves one call at a time
            out = queued[2].result() if isinstance(queued[2], TeacherAhead) else queued[2]
            if queued[0] is images and queued[1] is mask:
                return out
        return self.objective.teacher_output(images, mask)

    def _queue(self, images, mask) -> None:
        teacher = self.objective.teacher
        ahead = TeacherAhead(teacher, images, mask) if self.thread else self.objective.teacher_output(images, mask)
        self._queued = (images, mask, ahead)


class TeacherAhead:
    """`teacher(images, mask)` started on the helper thread, under this thread's autocast setting and without
    gradients; `result()` waits for it and returns the output, ready for this thread's current stream. The
    values are those of the teacher called in line: the same operators on the same inputs."""

    def __init__(self, teacher, images: torch.Tensor, mask):
        device = images.device
        amp_on, amp_dtype = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
        threads = torch.get_num_threads()  # a thread's own setting under OpenMP: the CPU's results depend on it
        stream = _side_stream(device) if device.type == "cuda" else None
        inputs_ready = None
        if stream is not None:
            inputs_ready = torch.cuda.current_stream(device).record_event()  # their copies to the device
            for t in (images, mask):
                if t is not None:  # their memory is not reused before the teacher's stream has read them
                    t.record_stream(stream)

        def forward():
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_on), \
                    (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                if stream is not None:
                    stream.wait_event(inputs_ready)
                out = teacher(images, mask)
                return out, (stream.record_event() if stream is not None else None)
        self.device = device
        self._future = helper_thread("teacher-ahead").submit(forward)

    def result(self):
        """The teacher's output (an error of its forward is raised here)."""
        out, done = self._future.result()
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for t in tensors_in(out):  # allocated on the teacher's stream, read on this one from now on
                t.record_stream(current)
        return out


_streams: dict = {}


def _side_stream(device: torch.device):
    """One teacher stream per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(index)
    return _streams[index]
