"""A trained detector at work: its detections drawn on images, and its COCO metrics on a validation split.

The model and its evaluation-time resize come from the checkpoint alone (a trial checkpoint carries its config
and its categories), so a researcher can look at what a student detects without the experiment around it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, SequentialSampler
from torchvision.transforms.v2 import functional as F

from trainers.checkpoint import load_detector
from trainers.config import AugmentConfig, DataConfig, TrialConfig
from trainers.data.batching import collate
from trainers.data.coco import build_dataset
from trainers.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from trainers.evaluate import evaluate
from trainers.postprocess import postprocess

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
           "#469990", "#dcbeff", "#9a6324"]


def load(checkpoint: Path) -> tuple[torch.nn.Module, list[str], AugmentConfig]:
    """(detector in eval mode, category name per label, the augmentation its trial evaluated with)."""
    model, meta = load_detector(checkpoint)
    config = meta.get("config")
    augment = TrialConfig.model_validate(config).data.augment if config else AugmentConfig()
    names = meta.get("category_names") or meta.get("label_names") or \
        [str(c) for c in (meta.get("category_ids") or range(model.num_classes))]
    return model, list(names), augment


@torch.no_grad()
def detect(model, image: Image.Image, augment: AugmentConfig, threshold: float) -> list[tuple[float, str, list]]:
    """One RGB image -> [(score, label index, [x0, y0, x1, y1] in its pixels)] above `threshold`, best first;
    resized as the trial's evaluation resized (shorter side to test_size, the longer at most max_size)."""
    x = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    h, w = x.shape[-2:]
    scale = min(augment.test_size / min(h, w), augment.max_size / max(h, w))
    x = F.resize(x, [round(h * scale), round(w * scale)], antialias=True)
    x = F.normalize(x, IMAGENET_MEAN, IMAGENET_STD)[None]
    out = model(x, torch.zeros(1, *x.shape[-2:], dtype=torch.bool)).predictions.layer(-1)
    (det,) = postprocess(out["logits"], out["boxes"], torch.tensor([[h, w]]))
    keep = det["scores"] >= threshold
    return [(float(s), int(lab), b.tolist()) for s, lab, b in zip(det["scores"][keep], det["labels"][keep],
                                                                  det["boxes"][keep])]


def draw(image: Image.Image, detections: list, names: list[str], title: Optional[str] = None,
         scale: int = 1) -> Image.Image:
    """The image (enlarged `scale` times, for small ones) with each detection's box, class name and score, and
    a title bar when given."""
    canvas = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.LANCZOS)
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(canvas.size) // 24))
    for score, label, box in detections:
        x0, y0, x1, y1 = (v * scale for v in box)
        colour = COLOURS[label % len(COLOURS)]
        pen.rectangle([x0, y0, x1, y1], outline=colour, width=max(1, round(min(canvas.size) / 100)))
        pen.text((x0 + 3, y0 + 2), f"{names[label]} {score:.2f}", fill=colour, font=font)
    if title:
        bar = font.size + 6
        framed = Image.new("RGB", (canvas.width, canvas.height + bar), "white")
        framed.paste(canvas, (0, bar))
        ImageDraw.Draw(framed).text((3, 2), title, fill="black", font=font)
        canvas = framed
    return canvas


def predict(checkpoint: Path, images: list[Path], out_dir: Path, threshold: float = 0.3,
            title: Optional[str] = None) -> list[Path]:
    """Each image with the checkpoint's detections drawn on it, as out_dir/<image stem>.png."""
    model, names, augment = load(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, images):
        image = Image.open(path).convert("RGB")
        drawn = draw(image, detect(model, image, augment, threshold), names, title)
        written.append(out_dir / f"{path.stem}.png")
        drawn.save(written[-1])
    return written


def side_by_side(checkpoints: dict[str, Path], images: list[Path], out_dir: Path, threshold: float = 0.3,
                 min_side: int = 256) -> list[Path]:
    """For each image, one PNG of the models' detections side by side (checkpoints: title -> checkpoint, in
    panel order), small images enlarged to `min_side`; written as out_dir/<image stem>.png."""
    models = {title: load(path) for title, path in checkpoints.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, images):
        image = Image.open(path).convert("RGB")
        scale = max(1, -(-min_side // min(image.size)))
        panels = [draw(image, detect(model, image, augment, threshold), names, title, scale)
                  for title, (model, names, augment) in models.items()]
        sheet = Image.new("RGB", (sum(p.width for p in panels) + 4 * (len(panels) - 1), panels[0].height), "white")
        for i, panel in enumerate(panels):
            sheet.paste(panel, (i * (panel.width + 4), 0))
        written.append(out_dir / f"{path.stem}.png")
        sheet.save(written[-1])
    return written


def evaluate_checkpoint(checkpoint: Path, data: DataConfig, batch_size: int = 8) -> dict:
    """COCO box metrics (AP .. APl) of a checkpoint on the validation split of `data`."""
    model, _, _ = load(checkpoint)
    val_set = build_dataset(data, "val")
    if model.num_classes != val_set.num_classes:
        raise ValueError(f"{checkpoint} predicts {model.num_classes} classes, {data.root}'s validation split has "
                         f"{val_set.num_classes}")
    loader = DataLoader(val_set, batch_size=batch_size, sampler=SequentialSampler(val_set), collate_fn=collate)
    return evaluate(model, loader, "cpu", val_set.category_ids, val_set.coco)
