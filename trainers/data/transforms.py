"""DETR's detection transforms on torchvision.transforms.v2 and tv_tensors.

A sample is `(image, target)`: image a tv_tensors.Image uint8 [3,H,W], target a dict whose 'boxes' are
tv_tensors.BoundingBoxes in XYXY pixels and whose 'labels' [M] follow them. v2 moves the boxes with the
image; the pieces v2 lacks (DETR's shortest-side resize, its random-size crop, dropping boxes a crop emptied)
are written here. The last step, `to_model_input`, turns the sample into what the model and the loss use:
a normalized float image and normalized (cx, cy, w, h) boxes. All randomness comes from torch's RNG.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from trainers.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _image_size(flat_inputs: list) -> tuple[int, int]:
    """(h, w) of the image among a v2 transform's flattened inputs."""
    for x in flat_inputs:
        if isinstance(x, tv_tensors.Image):
            return tuple(F.get_size(x))
    raise TypeError("the sample has no tv_tensors.Image")


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both inclusive, from torch's RNG."""
    return int(torch.randint(low, high + 1, ()))


def shortest_side_size(h: int, w: int, size: int, max_size: Optional[int] = None) -> tuple[int, int]:
    """(h, w) after scaling the shorter side to `size`, unless that makes the longer side exceed `max_size`,
    in which case the longer side becomes `max_size`. The aspect ratio is kept (up to rounding)."""
    scale = size / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


class RandomShortestResize(v2.Transform):
    """Resize so that the shorter side is a size drawn uniformly from `sizes` (longer side <= `max_size`)."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        super().__init__()
        self.sizes, self.max_size = list(sizes), max_size

    def make_params(self, flat_inputs: list) -> dict:
        h, w = _image_size(flat_inputs)
        size = self.sizes[_randint(0, len(self.sizes) - 1)]
        return dict(size=list(shortest_side_size(h, w, size, self.max_size)))

    def transform(self, inpt, params: dict):
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a window of width and height drawn uniformly from [min_size, min(image side, max_size)] at a uniform
    position. Boxes are clipped to the window (boxes left empty are dropped by `RemoveEmptyBoxes`). A side
    shorter than `min_size` is kept whole."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list) -> dict:
        h, w = _image_size(flat_inputs)
        cw = _randint(min(self.min_size, w), min(w, self.max_size))
        ch = _randint(min(self.min_size, h), min(h, self.max_size))
        return dict(top=_randint(0, h - ch), left=_randint(0, w - cw), height=ch, width=cw)

    def transform(self, inpt, params: dict):
        return self._call_kernel(F.crop, inpt, **params)


class RemoveEmptyBoxes(torch.nn.Module):
    """Drop boxes (and their labels) that a crop reduced to zero width or height."""

    def forward(self, image, target: dict):
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(keep.all()):
            target = dict(target, boxes=tv_tensors.wrap(boxes[keep], like=boxes), labels=target["labels"][keep])
        return image, target


def to_model_input(image, target: dict):
    """uint8 Image [3,H,W] + XYXY pixel boxes -> float image [3,H,W] normalized with ImageNet statistics and
    target boxes [M,4] float32 normalized (cx, cy, w, h); sets target['size'] = (h, w)."""
    h, w = F.get_size(image)
    image = F.normalize(F.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
    x0, y0, x1, y1 = target["boxes"].as_subclass(torch.Tensor).float().unbind(-1)
    boxes = torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], dim=-1)
    target = dict(target, boxes=boxes.reshape(-1, 4), size=torch.tensor([h, w], dtype=torch.int64))
    return image.as_subclass(torch.Tensor), target


def make_transforms(aug: AugmentConfig, train: bool) -> v2.Compose:
    """DETR's pipeline from an AugmentConfig. Train: flip (p=aug.flip), then with probability 1/2 a multi-scale
    resize, otherwise resize to one of aug.crop_resize, random-size crop, multi-scale resize (the crop branch
    only when aug.crop). Eval: shorter side to aug.test_size. Both cap the longer side at aug.max_size."""
    if not aug.scales or not aug.crop_resize:
        raise ValueError("augment.scales and augment.crop_resize must not be empty")
    if aug.crop_min > aug.crop_max:
        raise ValueError(f"augment.crop_min ({aug.crop_min}) is larger than augment.crop_max ({aug.crop_max})")
    if not train:
        return v2.Compose([RandomShortestResize([aug.test_size], aug.max_size), to_model_input])
    resize = RandomShortestResize(aug.scales, aug.max_size)
    if aug.crop:
        crop = v2.Compose([RandomShortestResize(aug.crop_resize), RandomSizeCrop(aug.crop_min, aug.crop_max),
                           RemoveEmptyBoxes(), RandomShortestResize(aug.scales, aug.max_size)])
        resize = v2.RandomChoice([resize, crop])
    return v2.Compose([v2.RandomHorizontalFlip(aug.flip), resize, to_model_input])
