"""What a detector's forward dispatches on a GPU under bf16 autocast, counted on a machine without one.

    python benchmarks/cuda_casts.py                      # paper scale, every family: fp32 / bf16 / bf16-ln
    python benchmarks/cuda_casts.py --where --families conditional_detr --dtypes bf16-ln   # where the casts are

The forward runs on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and devices without data or a
device; each operator's meta kernel applies CUDA's own dtype checks) under CUDA's autocast policy, set directly
(`torch.autocast("cuda")` refuses without a GPU). So the CPU sees what it cannot otherwise: CUDA's policy, not
the CPU's (on CUDA LayerNorm, softmax and sums run in float32, on the CPU in their input's dtype), and the
errors that only CUDA raises (a bf16 LayerNorm input with float32 weights: CUDA refuses, the CPU mixes them;
tests/test_fake_cuda.py). Counted: the aten operators of one forward, views excluded (as benchmarks/step.py's
"ops"; about one kernel launch each), and among them the casts (`_to_copy`), which autocast adds and which a
GPU step bound by its launches pays; and "syncs", the copies at which the host would wait for the GPU (a
blocking copy from host memory, a copy to it, an .item()), each listed with its line. Forward only: the autograd engine needs a real device for fake CUDA
tensors (each cast of a tensor that requires grad has one more in the backward).

Attention: without a device, PyTorch's choice of kernel falls back to its math path, which decomposes into
float32 operators; a GPU runs one fused kernel. `scaled_dot_product_attention` is counted as that one
operator, plus the casts autocast makes of its float32 inputs.
"""
import argparse
import collections
import contextlib
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import _NOT_LAUNCHES, COPIES, FAMILIES, SCALES, _model_config  # noqa: E402

DTYPES = ("fp32", "bf16", "bf16-plain", "bf16-ln")


@contextlib.contextmanager
def fake_cuda():
    """Tensors made inside are fake CUDA tensors (no data, no device needed). Pinning host memory (a host
    matter, which fake tensors do not implement) returns the tensor as it is."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    pin_memory = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    try:
        with FakeTensorMode(), torch.device("cuda"):
            yield
    finally:
        torch.Tensor.pin_memory = pin_memory


@contextlib.contextmanager
def cuda_autocast(enabled: bool = True):
    """torch.autocast("cuda", torch.bfloat16) without a GPU: the same state, set as its __enter__/__exit__ set it
    (the weight-cast cache lives for the outermost region)."""
    prev, prev_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", enabled)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev)
        torch.set_autocast_dtype("cuda", prev_dtype)


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched (views excluded), and the casts by where they come from; lists the
    copies that make the host wait for the GPU (`syncs`: a blocking copy from host memory, any copy to it, a
    value read with .item()), which a forward should not have: on a GPU each holds the host to the GPU's pace."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.ops, self.casts, self.where = collections.Counter(), collections.Counter(), where
        self.syncs: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if not self.paused and not func.is_view and name not in _NOT_LAUNCHES and func.namespace == "aten":
            self.ops[name] += 1
            if name == "_to_copy":
                self.casts[_caller() if self.where else "-"] += 1
        if name in ("_to_copy", "copy_", "_local_scalar_dense") and self._waits(name, args, kwargs):
            self.syncs.append(f"{name} at {_caller()}")
        return func(*args, **kwargs)

    @staticmethod
    def _waits(name, args, kwargs) -> bool:
        if name == "_local_scalar_dense":
            return args[0].device.type == "cuda"
        if name == "_to_copy":
            source, target = args[0].device, torch.device(kwargs.get("device") or args[0].device)
            non_blocking = kwargs.get("non_blocking", False)
        else:  # copy_(target, source, non_blocking)
            target, source = args[0].device, args[1].device
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return (source.type == "cpu" and target.type == "cuda" and not non_blocking) or \
            (source.type == "cuda" and target.type == "cpu")


def _caller() -> str:
    """The innermost frame of this project's code: file, line and source."""
    frames = [f for f in traceback.extract_stack() if any(f"/{pkg}/" in f.filename for pkg in ("trainers", "orchestrator"))]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno}  {f.line.strip()[:80]}"


@contextlib.contextmanager
def fused_attention(counter: OperatorCount):
    """scaled_dot_product_attention as a GPU runs it: one operator, after autocast's casts of its float32
    inputs to bf16 (counted as casts); the math path that computes the fake result is not counted. Patched in
    torch.nn.functional, where our models and nn.MultiheadAttention look it up."""
    sdpa = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        if torch.is_autocast_enabled("cuda"):
            for t in list(args[:3]) + [kwargs.get("attn_mask", args[3] if len(args) > 3 else None)]:
                if torch.is_tensor(t) and t.dtype == torch.float32:
                    counter.ops["_to_copy"] += 1
                    counter.casts[(_caller() if counter.where else "-") + "  (attention input)"] += 1
        counter.ops["_efficient_attention_forward"] += 1
        counter.paused = True
        try:
            return sdpa(*args, **kwargs)
        finally:
            counter.paused = False
    F.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def count_forward(model_fn, amp: bool, where: bool = False) -> OperatorCount:
    """Operators and casts of one call of `model_fn()` (made of fake CUDA tensors), under CUDA's bf16 autocast
    when `amp`."""
    counter = OperatorCount(where)
    # the default device as in a real run (fake_cuda makes it CUDA for building): host tensors made without a
    # device are host tensors
    with torch.device("cpu"), counter, fused_attention(counter), cuda_autocast(amp):
        model_fn()
    return counter


def as_the_engine_runs(model, dtype: str, frozen: bool = False):
    """`model` as the engine runs it in `dtype` (a step.py dtype, or one ending in -plain: autocast alone):
    bf16 norms for -ln, and for the dtypes that have them bf16 weight copies, made now as before a trial's
    first step (frozen: a teacher's)."""
    from trainers.accel.bf16_weights import BF16Weights
    from trainers.models.transformer_layers import set_bf16_layer_norm
    set_bf16_layer_norm(model, "-ln" in dtype)
    if dtype not in COPIES:
        return model
    forward = BF16Weights(model, frozen=frozen)
    forward.refresh()
    return forward


def build(family: str, scale: dict, dtype: str):
    """A fake-CUDA detector as the engine runs it in `dtype`, and its input -> a call of one forward."""
    from trainers.models import build_detector
    model = build_detector(_model_config(family, scale, scale["backbone"]), scale["classes"]).train()
    forward = as_the_engine_runs(model, dtype)
    images = torch.randn(scale["batch"], 3, scale["height"], scale["width"])
    mask = torch.zeros(scale["batch"], scale["height"], scale["width"], dtype=torch.bool)
    return lambda: forward(images, mask)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=SCALES, default="paper")
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "bf16-ln"], choices=DTYPES)
    ap.add_argument("--where", action="store_true", help="list the casts by the line of code that makes them")
    args = ap.parse_args(argv)
    scale = SCALES[args.scale]
    print(f"scale={args.scale} {scale}: one forward on fake CUDA tensors, CUDA's autocast policy; torch "
          f"{torch.__version__}")
    print(f"{'family':18s} {'dtype':10s} {'ops':>6s} {'casts':>6s} {'syncs':>6s}")
    for family in args.families:
        for dtype in args.dtypes:
            with fake_cuda():
                call = build(family, scale, dtype)
                counter = count_forward(call, dtype.startswith("bf16"), args.where)
            print(f"{family:18s} {dtype:10s} {sum(counter.ops.values()):6d} {counter.ops['_to_copy']:6d} "
                  f"{len(counter.syncs):6d}", flush=True)
            for sync in counter.syncs:
                print(f"    host waits: {sync}")
            if args.where:
                for place, n in counter.casts.most_common():
                    print(f"    {n:4d}  {place}")


if __name__ == "__main__":
    main()
