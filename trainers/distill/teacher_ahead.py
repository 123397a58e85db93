"""The frozen teacher's forward on the next batch, issued by a helper thread (RuntimeConfig.overlap_teacher:
"thread").

At batch 2 a GPU step waits on its host: issuing a forward's ~1000 kernels takes the host about as long as the
GPU takes to run them, and a distillation step issues the teacher's forward and the student's step one after
the other. Here a helper thread issues the teacher's, on a CUDA stream of its own, while this thread issues
the student's step: the two share the host's time (PyTorch releases the GIL while it dispatches an
operator), and their kernels may run side by side. The values are those of the teacher called in line: the
same operators on the same inputs.
"""
from contextlib import nullcontext

import torch

from trainers.helper_thread import helper_thread
from trainers.models.output import tensors_in


class TeacherAhead:
    """`teacher(images, mask)` started on the helper thread, under this thread's autocast setting and without
    gradients; `result()` waits for it and returns the output, ready for this thread's current stream."""

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
