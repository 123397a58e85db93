"""A synthetic detection task written to disk in COCO format, for machines that cannot download COCO.

Ten classes of shapes and glyphs in random colours (colour says nothing about the class, so the shape must be
learned), sizes from `min_size` (default 8%) to 65% of the shorter image side, 1 to `max_objects` per image, later objects
drawn over earlier ones (a box covers the visible extent; objects left mostly hidden are not labelled), on
backgrounds with gradients, soft blobs, thin lines and arcs, and pixel noise. Images are 3:4 to 1:1 in either
orientation so that batches need padding, as real ones do.

Every image is drawn from its own RNG seeded by (seed, split, index): the same seed gives byte-identical files,
and files never depend on how many images come before them.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from trainers.version import GENERATOR_VERSION  # bump it there when the drawing changes

MARKER = "synthetic.json"  # records the generator parameters in the dataset's root
SPLITS = ("train", "val")
SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered down: anti-aliased edges even on 10 px objects
MIN_VISIBLE = 0.4  # objects with less of their mask visible (occluded or outside the image) get no label
MIN_SIZE, MAX_SIZE = 0.08, 0.65  # longer side of an object's box / shorter image side, sampled log-uniformly


def _ngon(n: int, radius: float = 1.0, start: float = -math.pi / 2) -> np.ndarray:
    t = start + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    outer = _ngon(2 * points)
    return outer * np.where(np.arange(2 * points) % 2, inner, 1.0)[:, None]


def _poly(*xy: float) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


# class name -> (polygons in unit coordinates (x right, y down) as (points [P,2], fill 255 = draw, 0 = erase),
#                rotation jitter in degrees, rotations to pick from in degrees)
# Rotation is limited where it would turn one class into another (a square at 45 degrees is a diamond, a
# cross at 45 degrees is no longer a plus, an upside-down T is a different glyph).
SHAPES = {
    "circle": ([(_ngon(64), 255)], 0, (0,)),
    "square": ([(_poly(-1, -1, 1, -1, 1, 1, -1, 1), 255)], 12, (0,)),
    "triangle": ([(_poly(0, -1, 1, 0.75, -1, 0.75), 255)], 20, (0,)),
    "star": ([(_star(), 255)], 180, (0,)),
    "cross": ([(_poly(-0.3, -1, 0.3, -1, 0.3, -0.3, 1, -0.3, 1, 0.3, 0.3, 0.3, 0.3, 1, -0.3, 1, -0.3, 0.3,
                      -1, 0.3, -1, -0.3, -0.3, -0.3), 255)], 12, (0,)),
    "ring": ([(_ngon(64), 255), (_ngon(64, 0.58), 0)], 0, (0,)),
    "diamond": ([(_poly(0, -1, 0.6, 0, 0, 1, -0.6, 0), 255)], 12, (0,)),
    "hexagon": ([(_ngon(6), 255)], 180, (0,)),
    "arrow": ([(_poly(-1, -0.25, 0.15, -0.25, 0.15, -0.7, 1, 0, 0.15, 0.7, 0.15, 0.25, -1, 0.25), 255)], 10,
              (0, 90, 180, 270)),
    "tee": ([(_poly(-1, -1, 1, -1, 1, -0.45, 0.28, -0.45, 0.28, 1, -0.28, 1, -0.28, -0.45, -1, -0.45), 255)],
            15, (0,)),
}
CLASSES = tuple(SHAPES)
IMPLIED = {"min_size": MIN_SIZE, "classes": len(CLASSES)}  # what a marker file without the key means


def _object_mask(rng: np.random.Generator, name: str, size: float) -> np.ndarray:
    """A random instance of class `name` whose box has longer side `size` px -> alpha [h, w] uint8."""
    polys, jitter, turns = SHAPES[name]
    aspect = math.exp(rng.uniform(-0.2, 0.2))
    angle = math.radians(turns[rng.integers(len(turns))] + rng.uniform(-jitter, jitter))
    rot = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    polys = [((p * (aspect, 1 / aspect)) @ rot, fill) for p, fill in polys]
    lo, hi = polys[0][0].min(0), polys[0][0].max(0)  # the first polygon is the outline
    scale = size * SUPERSAMPLE / (hi - lo).max()
    w, h = np.maximum(np.ceil((hi - lo) * scale / SUPERSAMPLE), 1).astype(int)
    canvas = Image.new("L", (int(w) * SUPERSAMPLE, int(h) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for p, fill in polys:
        draw.polygon([tuple(q) for q in (p - lo) * scale], fill=fill)
    return np.asarray(canvas.reduce(SUPERSAMPLE))


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Two-colour linear gradient + soft blobs + thin lines and arcs: texture that is not an object."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    phi = rng.uniform(0, 2 * math.pi)
    t = np.add.outer(np.arange(h, dtype=np.float32) * math.sin(phi), np.arange(w, dtype=np.float32) * math.cos(phi))
    t = (t - t.min()) / max(t.max() - t.min(), 1.0)
    image = Image.merge("RGB", [Image.fromarray((c0[c] + (c1[c] - c0[c]) * t).astype(np.uint8)) for c in range(3)])
    for _ in range(rng.integers(0, 5)):
        # separable anisotropic Gaussian: soft-edged, so never mistaken for a crisp shape; drawn within 3 sigma
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sy, sx = rng.uniform(0.03, 0.2, 2) * min(h, w)
        y0, y1 = max(int(cy - 3 * sy), 0), min(int(cy + 3 * sy) + 1, h)
        x0, x1 = max(int(cx - 3 * sx), 0), min(int(cx + 3 * sx) + 1, w)
        gy = np.exp(-((np.arange(y0, y1, dtype=np.float32) - cy) / sy) ** 2)
        gx = np.exp(-((np.arange(x0, x1, dtype=np.float32) - cx) / sx) ** 2)
        alpha = (rng.uniform(0.3, 0.8) * 255 * np.outer(gy, gx)).astype(np.uint8)
        image.paste(_rgb(rng.uniform(0, 255, 3)), (x0, y0), Image.fromarray(alpha))
    _scribble(rng, image, rng.integers(2, 9))
    return image


def _rgb(colour) -> tuple:
    return tuple(int(c) for c in colour)


def _scribble(rng: np.random.Generator, image: Image.Image, n: int) -> None:
    """Draw n thin straight lines or arcs in random colours."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(n):
        colour = _rgb(rng.integers(0, 256, 3))
        width = int(rng.integers(1, 3))
        if rng.random() < 0.6:
            draw.line([tuple(rng.uniform(0, (w, h))), tuple(rng.uniform(0, (w, h)))], fill=colour, width=width)
        else:
            x0, y0 = rng.uniform(-0.2, 0.8) * w, rng.uniform(-0.2, 0.8) * h
            r = rng.uniform(0.1, 0.5) * min(w, h)
            start = rng.uniform(0, 360)
            draw.arc([x0, y0, x0 + r, y0 + r], start, start + rng.uniform(40, 200), fill=colour, width=width)


def _contrasting_colour(rng: np.random.Generator, region_mean: np.ndarray) -> np.ndarray:
    """A random colour far enough from the background under the object that the object is visible."""
    for _ in range(20):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - region_mean) > 100:
            return c
    return 255 - region_mean


def draw_image(rng: np.random.Generator, image_size: int, max_objects: int, min_size: float = MIN_SIZE,
               classes: int = len(CLASSES)):
    """-> (image uint8 [h, w, 3], objects [(label, [x, y, w, h] box of the visible pixels)]); labels are among
    the first `classes` of CLASSES."""
    long, short = image_size, max(1, round(image_size * rng.uniform(0.75, 1.0)))
    h, w = (long, short) if rng.random() < 0.5 else (short, long)
    image = _background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int16)  # index of the topmost object on each pixel
    placed = []  # (label, x0, y0, x1, y1 of the full mask, mask pixel count)
    for _ in range(rng.integers(1, max_objects + 1)):
        label = int(rng.integers(classes))
        size = min(h, w) * math.exp(rng.uniform(np.log(min_size), np.log(MAX_SIZE)))
        alpha = _object_mask(rng, CLASSES[label], size)
        mh, mw = alpha.shape
        for _ in range(20):  # place it so that it does not bury an earlier object
            x0 = int(rng.integers(-int(0.15 * mw), max(w - int(0.85 * mw), -int(0.15 * mw)) + 1))
            y0 = int(rng.integers(-int(0.15 * mh), max(h - int(0.85 * mh), -int(0.15 * mh)) + 1))
            if all(_covered(p[1:5], (x0, y0, x0 + mw, y0 + mh)) < 0.5 for p in placed):
                break
        else:
            continue
        # the part of the mask inside the image
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + mw, w), min(y0 + mh, h)
        a = alpha[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
        under = np.asarray(image.crop((ix0, iy0, ix1, iy1)), dtype=np.float32).reshape(-1, 3).mean(0)
        image.paste(_rgb(_contrasting_colour(rng, under)), (ix0, iy0), Image.fromarray(a))
        owner[iy0:iy1, ix0:ix1][a >= 128] = len(placed)
        placed.append((label, x0, y0, x0 + mw, y0 + mh, int((alpha >= 128).sum())))

    _scribble(rng, image, rng.integers(0, 3))  # a few lines over the objects, as occluders
    # pixel noise, uniform in [-k, k] (std 2 to 14): integer draws are ~4x faster than Gaussian floats
    k = int(rng.integers(3, 25))
    img = np.asarray(image).astype(np.int16) + rng.integers(-k, k + 1, (h, w, 3), dtype=np.int16)
    objects = []
    for k, (label, x0, y0, x1, y1, full) in enumerate(placed):
        ix0, iy0 = max(x0, 0), max(y0, 0)
        visible = owner[iy0:max(y1, 0), ix0:max(x1, 0)] == k
        if visible.sum() < MIN_VISIBLE * full:
            continue
        cols, rows = np.flatnonzero(visible.any(0)), np.flatnonzero(visible.any(1))
        bx, by = ix0 + int(cols[0]), iy0 + int(rows[0])
        objects.append((label, [bx, by, int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]))
    return np.clip(img, 0, 255, out=img).astype(np.uint8), objects


def _covered(box, by) -> float:
    """Fraction of `box` (x0, y0, x1, y1) covered by `by`."""
    iw = min(box[2], by[2]) - max(box[0], by[0])
    ih = min(box[3], by[3]) - max(box[1], by[1])
    return max(iw, 0) * max(ih, 0) / max((box[2] - box[0]) * (box[3] - box[1]), 1)


def synthetic_params(train: int = 2000, val: int = 300, seed: int = 0, image_size: int = 256,
                     max_objects: int = 8, min_size: float = MIN_SIZE, classes: int = len(CLASSES)) -> dict:
    """What the marker file records: everything the files depend on."""
    params = dict(generator="detrdistill.synthetic", version=GENERATOR_VERSION, train=train, val=val, seed=seed,
                  image_size=image_size, max_objects=max_objects)
    # recorded only when changed: datasets made before they existed stay valid
    params.update({k: v for k, v in (("min_size", min_size), ("classes", classes)) if v != IMPLIED[k]})
    return params


def make_synthetic(out_dir, train: int = 2000, val: int = 300, seed: int = 0, image_size: int = 256,
                   max_objects: int = 8, min_size: float = MIN_SIZE,
                   progress: Optional[Callable[[str, int, int], None]] = None, classes: int = len(CLASSES)) -> Path:
    """Write out_dir/{train,val}/NNNNNN.jpg, out_dir/annotations/instances_{train,val}.json (COCO instances)
    and the marker out_dir/synthetic.json (written last: its presence means the dataset is complete).
    progress(split, done, total) is called after every image. Returns out_dir."""
    if min(train, val, max_objects) < 1 or image_size < 32 or not 0 < min_size < MAX_SIZE or \
            not 1 <= classes <= len(CLASSES):
        raise ValueError(f"make_synthetic needs train, val, max_objects >= 1, image_size >= 32, "
                         f"0 < min_size < {MAX_SIZE} and 1 <= classes <= {len(CLASSES)}")
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(CLASSES[:classes])]
    for split_index, (split, n) in enumerate(zip(SPLITS, (train, val))):
        (out / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, split_index, i])
            pixels, objects = draw_image(rng, image_size, max_objects, min_size, classes)
            name = f"{i:06d}.jpg"
            # JPEG like COCO: noisy images make PNGs ~6x larger and ~20x slower to write
            Image.fromarray(pixels).save(out / split / name, quality=90)
            images.append(dict(id=i + 1, file_name=name, height=pixels.shape[0], width=pixels.shape[1],
                               license=1))
            for label, box in objects:
                # area = box area (there are no segmentations): it decides COCOeval's small/medium/large
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=label + 1,
                                        bbox=box, area=box[2] * box[3], iscrowd=0))
            if progress is not None:
                progress(split, i + 1, n)
        coco = dict(info=dict(description=f"detrdistill synthetic shapes, {split}, seed {seed}",
                              version=str(GENERATOR_VERSION), year=2024, contributor="detrdistill",
                              url="", date_created="2024-01-01"),
                    licenses=[dict(id=1, name="CC0 1.0", url="https://creativecommons.org/publicdomain/zero/1.0/")],
                    images=images, annotations=annotations, categories=categories)
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco, f)
    with open(out / MARKER, "w") as f:
        json.dump(synthetic_params(train, val, seed, image_size, max_objects, min_size, classes), f, indent=1)
    return out


def print_progress(split: str, done: int, total: int) -> None:
    """A progress callback for make_synthetic that prints every 10% to stderr."""
    if done == total or done % max(total // 10, 1) == 0:
        print(f"synthetic dataset: {split} {done}/{total} images", file=sys.stderr, flush=True)


def ensure_synthetic(root, train: int, val: int, seed: int, image_size: int, max_objects: int = 8,
                     min_size: float = MIN_SIZE,
                     progress: Optional[Callable[[str, int, int], None]] = print_progress,
                     classes: int = len(CLASSES)) -> Path:
    """Generate the dataset into `root` unless it is already there with the same parameters.

    Safe when several processes ask at once (parallel trials): each generates into a private folder and
    renames it into place; the first rename wins and the others discard theirs. Raises ValueError when `root`
    holds something else.
    """
    root = Path(root)
    wanted = synthetic_params(train, val, seed, image_size, max_objects, min_size, classes)
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            make_synthetic(tmp, train, val, seed, image_size, max_objects, min_size, progress, classes)
            try:
                os.rename(tmp, root)  # atomic; fails if another process already put a complete one there
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    marker = root / MARKER
    if not marker.is_file():
        raise ValueError(f"{root} exists but is not a synthetic dataset made by detrdistill (no {MARKER}); "
                         f"delete it or choose another data.root")
    found = json.loads(marker.read_text())
    if found != wanted:
        found, wanted = {**IMPLIED, **found}, {**IMPLIED, **wanted}
        diff = ", ".join(f"{k}: {found.get(k)!r} on disk, {v!r} wanted" for k, v in wanted.items()
                         if found.get(k) != v)
        raise ValueError(f"{root} holds a synthetic dataset made with other parameters ({diff}); "
                         f"delete it or choose another data.root")
    return root
