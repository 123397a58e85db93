"""Train-step time and peak memory: ours vs transformers' model of the same config, measured side by side.

    python benchmarks/step.py                 # tiny CPU config (every family), ratios only are meaningful
    python benchmarks/step.py --scale paper   # 800x1066, batch 2, resnet50, 300 queries (a GPU)
    python benchmarks/step.py --distill       # also: distillation step vs student step vs the floor

Each measurement runs in its own subprocess so peak memory is per configuration. One step = forward, the
set loss (ours: our criterion; transformers: its own loss), backward, AdamW step. Reported: the median over
--steps timed steps after --warmup steps. On the CPU "peak memory" is the process's peak RSS; on CUDA it is
torch.cuda.max_memory_allocated.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

FAMILIES = ["conditional_detr", "deformable_detr", "adamixer"]
HF_FAMILIES = {"conditional_detr", "deformable_detr"}
SCALES = {
    "tiny": dict(height=128, width=160, batch=2, backbone="resnet18", queries=50, hidden=128, enc=2, dec=2,
                 classes=10),
    "paper": dict(height=800, width=1066, batch=2, backbone="resnet50", queries=300, hidden=256, enc=6, dec=6,
                  classes=91),
}


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _targets(scale, device):
    import torch
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(scale["batch"]):
        n = 5
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        out.append({"labels": torch.randint(0, scale["classes"], (n,), generator=g).to(device),
                    "boxes": torch.cat([cxcy, wh], 1).to(device),
                    "size": torch.tensor([scale["height"], scale["width"]], device=device)})
    return out


def _ours(family, scale, device, dtype, distill):
    import torch
    from detrdistill.trainers.config import ModelConfig, DistillConfig
    from detrdistill.trainers.criterion import SetCriterion
    from detrdistill.trainers.engine import DetectionLoss
    from detrdistill.trainers.models import build_detector
    kw = dict(family=family, backbone=scale["backbone"], decoder_layers=scale["dec"], num_queries=scale["queries"],
              hidden_dim=scale["hidden"])
    if family != "adamixer":
        kw["encoder_layers"] = scale["enc"]
    model = build_detector(ModelConfig(**kw), scale["classes"]).to(device).train()
    criterion = SetCriterion(scale["classes"])
    loss_fn = DetectionLoss(criterion)
    if distill != "none":
        from detrdistill.trainers.distill.objective import DistillationLoss
        teacher = build_detector(ModelConfig(**{**kw, "backbone": "resnet50" if scale["backbone"] == "resnet18"
                                                else "resnet101"}), scale["classes"]).to(device)
        cfg = DistillConfig(method="detrdistill")
        if distill == "floor":  # the parts a distillation step cannot avoid: teacher forward + extra group
            cfg = DistillConfig(method="detrdistill", logits={"weight": 0}, feature={"weight": 0})
        loss_fn = DistillationLoss(teacher, criterion, cfg, scale["hidden"], scale["hidden"], scale["dec"],
                                   scale["dec"], model.config.levels).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if getattr(loss_fn, "trainable", None) is not None:
        params += list(loss_fn.trainable.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    images = torch.randn(scale["batch"], 3, scale["height"], scale["width"], device=device)
    mask = torch.zeros(scale["batch"], scale["height"], scale["width"], dtype=torch.bool, device=device)
    targets = _targets(scale, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_fn(model, images, mask, targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _hf(family, scale, device, dtype):
    import torch
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, DeformableDetrConfig, \
        DeformableDetrForObjectDetection
    from detrdistill.trainers.models.hf_backbone import hf_resnet_config
    levels = 1 if family == "conditional_detr" else 4
    out_features = ["stage4"] if levels == 1 else ["stage2", "stage3", "stage4"]
    common = dict(backbone_config=hf_resnet_config(scale["backbone"], out_features=out_features),
                  encoder_layers=scale["enc"], decoder_layers=scale["dec"], num_queries=scale["queries"],
                  d_model=scale["hidden"], num_labels=scale["classes"], auxiliary_loss=True)
    if family == "conditional_detr":
        model = ConditionalDetrForObjectDetection(ConditionalDetrConfig(**common))
    else:
        model = DeformableDetrForObjectDetection(DeformableDetrConfig(**common, num_feature_levels=levels))
    model = model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.randn(scale["batch"], 3, scale["height"], scale["width"], device=device)
    pixel_mask = torch.ones(scale["batch"], scale["height"], scale["width"], dtype=torch.long, device=device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in _targets(scale, device)]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(args) -> dict:
    """Runs in the child process: build one configuration, time it, print a JSON line."""
    import resource
    import torch
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = SCALES[args.scale]
    step = _hf(args.family, scale, device, args.dtype) if args.impl == "transformers" else \
        _ours(args.family, scale, device, args.dtype, args.distill)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_s": statistics.median(times), "peak_mib": peak, "device": str(device)}


def run_child(family, impl, scale, dtype, steps, warmup, distill="none") -> dict:
    cmd = [sys.executable, __file__, "--child", "--family", family, "--impl", impl, "--scale", scale,
           "--dtype", dtype, "--steps", str(steps), "--warmup", str(warmup), "--distill", distill]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=SCALES, default="tiny")
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--dtypes", nargs="+", default=None, help="fp32 and/or bf16 (bf16 only on CUDA)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--distill", action="store_true", help="also measure distillation step vs floor")
    # child-process arguments
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--family", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--distill-mode", dest="distill_mode", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args(argv)
    if args.child:
        args.distill = args.distill_mode if args.distill_mode else (sys.argv[sys.argv.index("--distill") + 1]
                                                                     if "--distill" in sys.argv else "none")
        print(json.dumps(measure(args)), flush=True)
        return
    import torch
    dtypes = args.dtypes or (["fp32", "bf16"] if torch.cuda.is_available() else ["fp32"])
    print(f"scale={args.scale} {SCALES[args.scale]}")
    print(f"{'family':18} {'dtype':5} {'ours s/step':>12} {'hf s/step':>10} {'ours/hf':>8} {'ours MiB':>9} {'hf MiB':>8}")
    for family in args.families:
        for dtype in dtypes:
            ours = run_child(family, "ours", args.scale, dtype, args.steps, args.warmup)
            hf = run_child(family, "transformers", args.scale, dtype, args.steps, args.warmup) \
                if family in HF_FAMILIES else {}
            if "error" in ours:
                print(f"{family:18} {dtype:5} ours failed: {ours['error']}")
                continue
            ratio = f"{ours['median_s'] / hf['median_s']:.2f}" if "median_s" in hf else "-"
            hf_s = f"{hf['median_s']:.4f}" if "median_s" in hf else (hf.get("error", "-")[:10])
            hf_m = f"{hf['peak_mib']:.0f}" if "peak_mib" in hf else "-"
            print(f"{family:18} {dtype:5} {ours['median_s']:12.4f} {hf_s:>10} {ratio:>8} {ours['peak_mib']:9.0f} {hf_m:>8}")
    if args.distill:
        print("\ndistillation step (detrdistill, all terms) vs student-only step and the floor "
              "(student step + teacher forward + extra query group)")
        print(f"{'family':18} {'dtype':5} {'student':>9} {'floor':>9} {'distill':>9} {'distill/student':>16} "
              f"{'distill/floor':>14}")
        for family in args.families:
            for dtype in dtypes:
                r = {m: run_child(family, "ours", args.scale, dtype, args.steps, args.warmup, m)
                     for m in ("none", "floor", "full")}
                if any("error" in v for v in r.values()):
                    print(f"{family:18} {dtype:5} failed: {[v.get('error') for v in r.values()]}")
                    continue
                s, f, d = (r[m]["median_s"] for m in ("none", "floor", "full"))
                print(f"{family:18} {dtype:5} {s:9.4f} {f:9.4f} {d:9.4f} {d / s:16.2f} {d / f:14.2f}")


if __name__ == "__main__":
    main()
