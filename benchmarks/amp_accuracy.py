"""Does the bf16 residual stream (schedule.amp_layer_norm bfloat16) train as well as autocast's float32 norms?

    python benchmarks/amp_accuracy.py --families conditional_detr --seeds 0 1

Trains the small config (tests/test_learning.py: small_config; minutes a run on a CPU, in float32) three ways per family and seed, and prints the last epoch's mean train loss and the val AP / AP50:
- fp32: amp off;
- bf16: amp as the engine runs it on CUDA (bf16 autocast, weights as bf16 copies, float32 LayerNorm outputs);
- bf16-ln: the same with amp_layer_norm bfloat16.
On a machine without CUDA amp is forced on (the engine ignores it on the CPU), so bf16 runs on the CPU's
autocast: its operator policy differs from CUDA's in places (the CPU keeps LayerNorm in its input's dtype,
runs scaled_dot_product_attention in float32), so this compares numerics, not speed.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODES = ("fp32", "bf16", "bf16-ln")


def run(family: str, seed: int, mode: str, data_root: Path) -> dict:
    import torch
    from trainers import engine
    from test_learning import small_config
    config = small_config(family, data_root)
    schedule = config.schedule.model_copy(update={"amp": mode != "fp32",
                                                  "amp_layer_norm": "bfloat16" if mode == "bf16-ln" else "float32"})
    config = config.model_copy(update={"schedule": schedule, "seed": seed})
    if not torch.cuda.is_available():
        engine.amp_enabled = lambda schedule, device: schedule.amp  # the CPU's bf16 autocast
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        metrics = engine.run_trial(config, Path(workdir), log=lambda s: None)
    return {"loss": metrics["train/loss"], "AP": metrics["AP"], "AP50": metrics["AP50"],
            "seconds": time.perf_counter() - t0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["conditional_detr"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--data", type=Path, default=None, help="synthetic data folder (made if missing)")
    args = parser.parse_args(argv)
    data_root = args.data or Path(tempfile.mkdtemp(prefix="amp-accuracy-"))
    print(f"{'family':18} {'seed':>4} {'mode':8} {'train loss':>10} {'AP':>7} {'AP50':>7} {'seconds':>8}", flush=True)
    for family in args.families:
        for seed in args.seeds:
            for mode in args.modes:
                r = run(family, seed, mode, data_root)
                print(f"{family:18} {seed:4d} {mode:8} {r['loss']:10.4f} {r['AP']:7.4f} {r['AP50']:7.4f} "
                      f"{r['seconds']:8.0f}", flush=True)


if __name__ == "__main__":
    main()
