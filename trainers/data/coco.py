"""COCO-format detection dataset: one instances JSON + one image folder.

The JSON is checked when the dataset is built (before any compute) by the rules of check.py, which also
repair what they handle (a missing area or iscrowd filled in, boxes clamped to their image, degenerate ones
dropped); every error names the file, the record id and the field. Targets follow DETR: contiguous labels
and normalized (cx, cy, w, h) boxes relative to the transformed image.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from trainers.config import DataConfig

from .check import (IMAGE_MODES, DatasetError, Findings, MissingDataError, check_image_files, check_records,
                    exif_orientation, line, load_json, missing_file, size_mismatch, unreadable, unsupported_mode)
from .synthetic import ensure_synthetic
from .transforms import make_transforms, to_model_input

def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of an image in any of check.IMAGE_MODES."""
    if IMAGE_MODES.get(im.mode) == "16bit_images":
        # PIL's convert clips 16-bit values at 255; scale them instead, to the nearest 8-bit level
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))
    return im.convert("RGB")


class CocoDetection(Dataset):
    """Images of one split with their (non-crowd) boxes.

    Args:
        image_dir: folder that `file_name` of each image is relative to.
        ann_file: COCO instances JSON.
        transforms: callable (image Image uint8 [3,H,W], target) -> (image, target) that ends in
            `to_model_input` (see transforms.py); None = no augmentation, only normalization.
        limit: use only the first `limit` images, in file order (debug / overfit runs).

    Attributes:
        ids: image ids served, in order; evaluation should restrict COCOeval to these.
        coco: pycocotools COCO over the whole file as check.py repaired it (crowd annotations included, for
            COCOeval; degenerate boxes left out).
        category_ids: label -> COCO category id (sorted ids, so labels are 0..C-1).
        category_names: label -> category name.
        num_classes: C.
        handled: check.HANDLED key -> count of the quirks the JSON has (nonzero only), for the trial's log;
            the image files' quirks (modes, EXIF) are counted by check.check_coco, which reads every header.

    __getitem__(i) -> (image [3,H,W] float32 normalized, target) with target:
        labels [M] int64, boxes [M,4] float32 normalized (cx,cy,w,h), image_id int,
        orig_size [2] int64 (h,w) of the file, size [2] int64 (h,w) after transforms.
    """

    def __init__(self, image_dir, ann_file, transforms: Optional[Callable] = None, limit: Optional[int] = None):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.transforms = transforms if transforms is not None else to_model_input
        findings = Findings(self.ann_file)
        data = load_json(self.ann_file, findings)
        records = check_records(data, findings) if data is not None else None
        findings.raise_problems()
        self.handled = findings.report().handled

        self.category_ids = [c["id"] for c in records.categories]
        self.category_names = [c["name"] for c in records.categories]
        self.num_classes = len(self.category_ids)
        self._images = records.images
        self.ids = list(records.images)[:limit]
        self._targets = self._build_targets(records.annotations)
        check_image_files({i: self._images[i] for i in self.ids}, self.image_dir, findings, headers=False)
        findings.raise_problems()

        # pycocotools prints while indexing; the records are already parsed, so hand them over instead of a file
        self.coco = COCO()
        self.coco.dataset = dict(data, images=list(records.images.values()), annotations=records.annotations,
                                 categories=records.categories)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    def _build_targets(self, annotations: list) -> dict:
        """image id -> (labels [M] int64, boxes [M,4] float32 xyxy pixels) of the served images."""
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        labels, boxes = {i: [] for i in self.ids}, {i: [] for i in self.ids}
        for ann in annotations:
            if ann["iscrowd"] or ann["image_id"] not in labels:
                continue  # crowd regions are not instances to predict; COCOeval ignores detections on them
            x, y, w, h = ann["bbox"]
            labels[ann["image_id"]].append(label_of[ann["category_id"]])
            boxes[ann["image_id"]].append((x, y, x + w, y + h))
        return {i: (np.asarray(labels[i], dtype=np.int64), np.asarray(boxes[i], dtype=np.float32).reshape(-1, 4))
                for i in self.ids}

    def _image_path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self._images[image_id]["file_name"])

    def _refuse(self, image_id: int, field: str, message: str, error=DatasetError):
        raise error(line(self.ann_file, f"image id {image_id}", field, message))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info, path = self._images[image_id], self._image_path(image_id)
        try:
            with Image.open(path) as stored:
                mode, orientation = stored.mode, exif_orientation(stored)
                im = to_rgb(stored) if mode in IMAGE_MODES else None  # decodes: a truncated file fails here
        except FileNotFoundError:
            self._refuse(image_id, "file_name", missing_file(path), MissingDataError)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            self._refuse(image_id, "file_name", unreadable(path, e))
        if im is None:
            self._refuse(image_id, "file_name", unsupported_mode(path, mode))
        mismatch = size_mismatch(info, im.size, path, orientation)
        if mismatch:
            self._refuse(image_id, "width/height", mismatch)
        image = tv_tensors.Image(F.pil_to_tensor(im))  # [3,H,W] uint8
        labels, boxes = self._targets[image_id]
        h, w = info["height"], info["width"]
        target = {
            "image_id": image_id,
            "labels": torch.from_numpy(labels.copy()),
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes.copy()), format="XYXY", canvas_size=(h, w)),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        return self.transforms(image, target)


def build_dataset(data_config: DataConfig, split: str) -> CocoDetection:
    """The `split` ("train" or "val") of a DataConfig, with DETR's train or eval transforms.

    For format "synthetic" the dataset is first generated into data_config.root (once; later calls and other
    processes reuse it) and then read like any COCO dataset.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(data_config.root)
    if data_config.format == "synthetic":
        try:
            ensure_synthetic(root, data_config.synthetic_train, data_config.synthetic_val,
                             data_config.synthetic_seed, data_config.synthetic_image_size,
                             data_config.synthetic_max_objects, data_config.synthetic_min_size,
                             classes=data_config.synthetic_classes)
        except ValueError as e:
            raise DatasetError(str(e)) from None
    train = split == "train"
    return CocoDetection(
        root / (data_config.train_images if train else data_config.val_images),
        root / (data_config.train if train else data_config.val),
        transforms=make_transforms(data_config.augment, train=train),
        limit=data_config.limit_train if train else data_config.limit_val,
    )
