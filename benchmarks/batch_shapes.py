"""How many batch shapes DETR's training augmentation makes, and what the CUDA graphs' capture policy does with
them, at each data.pad_size_divisor.

    python benchmarks/batch_shapes.py                          # COCO-like image sizes (assumed, see below)
    python benchmarks/batch_shapes.py --coco instances_train2017.json   # the sizes of a real COCO split

Image sizes go through the real training transforms (trainers/data/transforms.py, AugmentConfig's defaults:
11 scales, max 1333, the crop branch, flip) one epoch's worth, batched in order, each batch padded as
`collate` pads it; the shapes are then fed to the real capture policy (trainers/accel/cuda_graphs.ShapeGraphs:
a shape captured the second time it comes, at most K graphs kept, capturing stopped when shapes vary too much), with
captures that make nothing. Reported per divisor: distinct batch shapes, padded pixels over image pixels, and
per K the share of steps that would replay a graph and whether capturing stopped (at which step). Two batch
orders: `random` (DETR's sampler) and `grouped` (MMDetection 2's GroupSampler, in DETRDistill's official code:
each batch drawn from images of one orientation, landscape or not, of the original image).

Without --coco the sizes are drawn from an assumed COCO-like mix (COCO images are at most 640 px on the longer
side, mostly 4:3): longer side 640, shorter side 480 (55%), 427 (20%), 360 (8%) or uniform in 240-640 (17%),
70% landscape. The transforms only read the image size, so images are blank.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torchvision import tv_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def coco_like_sizes(n: int, gen: torch.Generator) -> list:
    """n (h, w) from the assumed mix in the module docstring."""
    sizes = []
    for _ in range(n):
        u = float(torch.rand((), generator=gen))
        short = 480 if u < 0.55 else 427 if u < 0.75 else 360 if u < 0.83 else \
            int(torch.randint(240, 641, (), generator=gen))
        landscape = float(torch.rand((), generator=gen)) < 0.7
        sizes.append((short, 640) if landscape else (640, short))
    return sizes


def augmented_sizes(sizes: list, seed: int) -> list:
    """(h, w) of each image after the training transforms."""
    from trainers.config import AugmentConfig
    from trainers.data.transforms import make_transforms
    torch.manual_seed(seed)
    transforms = make_transforms(AugmentConfig(), train=True)
    out = []
    for h, w in sizes:
        image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
        target = {"boxes": tv_tensors.BoundingBoxes([[0, 0, w, h]], format="XYXY", canvas_size=(h, w)),
                  "labels": torch.zeros(1, dtype=torch.int64)}
        image, _ = transforms(image, target)
        out.append(tuple(image.shape[-2:]))
    return out


def batch_shapes(sizes: list, batch: int, divisor: int) -> list:
    """The padded (H, W) of each batch, as `collate` pads it."""
    shapes = []
    for i in range(0, len(sizes), batch):
        h = max(s[0] for s in sizes[i:i + batch])
        w = max(s[1] for s in sizes[i:i + batch])
        shapes.append((-(-h // divisor) * divisor, -(-w // divisor) * divisor))
    return shapes


def grouped_order(sizes: list, batch: int, gen: torch.Generator) -> list:
    """Image indices in GroupSampler's order: each orientation's images (landscape: w > h) shuffled and cut
    into batches (a group's last partial batch dropped), the batches shuffled together."""
    batches = []
    for landscape in (True, False):
        group = [i for i, (h, w) in enumerate(sizes) if (w > h) == landscape]
        group = [group[int(j)] for j in torch.randperm(len(group), generator=gen)]
        batches += [group[j:j + batch] for j in range(0, len(group) - batch + 1, batch)]
    return [i for j in torch.randperm(len(batches), generator=gen) for i in batches[int(j)]]


def policy(shapes: list, max_graphs: int) -> dict:
    """The capture policy over the shapes: replayed steps, captures, and the step where capturing stopped."""
    import warnings
    from trainers.accel.cuda_graphs import ShapeGraphs
    graphs = ShapeGraphs(max_graphs)
    replayed, stopped_at = 0, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, shape in enumerate(shapes):
            before = graphs.replays
            graphs._graph_for(shape, lambda: object())
            replayed += graphs.replays > before
            if graphs.stopped is not None and stopped_at is None:
                stopped_at = step + 1
    return {"replayed": replayed / len(shapes), "captures": graphs.captures, "stopped_at": stopped_at}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coco", help="a COCO instances JSON: its images' sizes (else the assumed COCO-like mix)")
    ap.add_argument("--images", type=int, default=2000, help="images in the epoch (sampled from the sizes)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--divisors", type=int, nargs="+", default=[1, 32, 128, 256])
    ap.add_argument("--graphs", type=int, nargs="+", default=[2, 8], help="graphs kept (student 2, teacher 8)")
    ap.add_argument("--orders", nargs="+", choices=("random", "grouped"), default=["random", "grouped"],
                    help="batch orders: DETR's random sampler, MMDetection 2's GroupSampler (by orientation)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    if args.coco:
        images = json.loads(Path(args.coco).read_text())["images"]
        pool = [(im["height"], im["width"]) for im in images]
        sizes = [pool[int(i)] for i in torch.randint(len(pool), (args.images,), generator=gen)]
        source = f"{args.coco} ({len(pool)} images)"
    else:
        sizes = coco_like_sizes(args.images, gen)
        source = "the assumed COCO-like mix"
    augmented = augmented_sizes(sizes, args.seed)  # sizes are drawn at random: their order is random already
    orders = {"random": augmented, "grouped": [augmented[i] for i in grouped_order(sizes, args.batch, gen)]}
    print(f"{args.images} images from {source}, DETR's training augmentation, batch {args.batch}", flush=True)
    print(f"{'order':7s} {'divisor':>7} {'shapes':>6} {'padded px':>9} " +
          " ".join(f"{f'K={k}: replayed':>14} {'captures':>8} {'stopped':>7}" for k in args.graphs))
    for order, divisor in ((o, d) for o in args.orders for d in args.divisors):
        epoch = orders[order]
        shapes = batch_shapes(epoch, args.batch, divisor)
        image_px = [sum(h * w for h, w in epoch[i:i + args.batch]) for i in range(0, len(epoch), args.batch)]
        padded = statistics.mean(args.batch * h * w / px for (h, w), px in zip(shapes, image_px))
        row = f"{order:7s} {divisor:7d} {len(set(shapes)):6d} {padded:9.2f} "
        for k in args.graphs:
            p = policy(shapes, k)
            stopped = f"step {p['stopped_at']}" if p["stopped_at"] else "no"
            row += f"{p['replayed']:14.0%} {p['captures']:8d} {stopped:>7} "
        print(row, flush=True)


if __name__ == "__main__":
    main()
