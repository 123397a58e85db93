"""COCO-format detection dataset: one instances JSON + one image folder.

Everything that can be wrong with the data is checked when the dataset is built (before any compute), and
every error names the file and the id that is wrong. Targets follow DETR: contiguous labels and normalized
(cx, cy, w, h) boxes relative to the transformed image.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
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

from .synthetic import ensure_synthetic
from .transforms import make_transforms, to_model_input


class DatasetError(ValueError):
    """The data on disk is not usable; the message says which file / id and what is wrong."""


class MissingDataError(DatasetError, FileNotFoundError):
    """A file the dataset needs does not exist."""


def _load_json(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise MissingDataError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file} is not a COCO instances file: the top level is a "
                           f"{type(data).__name__}, expected an object with images/annotations/categories")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetError(f"{ann_file} is not a COCO instances file: missing key(s) {', '.join(missing)}")
    for k in ("images", "annotations", "categories"):
        if not isinstance(data[k], list):
            raise DatasetError(f"{ann_file}: '{k}' must be a list, got {type(data[k]).__name__}")
    return data


def _require(record, keys: dict, what: str, section: str, ann_file: Path) -> None:
    """Check that a JSON record is an object with `keys` of the given types (bool is never a number)."""
    if not isinstance(record, dict):
        raise DatasetError(f"{ann_file}: every entry of '{section}' must be an object, got {record!r:.80}")
    for key, types in keys.items():
        rid = record.get("id", "?")
        if key not in record:
            raise DatasetError(f"{ann_file}: {what} id {rid} has no '{key}' (is this a COCO instances file?)")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise DatasetError(f"{ann_file}: {what} id {rid} has '{key}' = {value!r:.80}, "
                               f"expected {' or '.join(t.__name__ for t in types)}")


def _unique_ids(records: list, what: str, ann_file: Path) -> None:
    seen = set()
    for r in records:
        if r["id"] in seen:
            raise DatasetError(f"{ann_file}: duplicate {what} id {r['id']}")
        seen.add(r["id"])


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
        coco: pycocotools COCO over the whole file (crowd annotations included, for COCOeval).
        category_ids: label -> COCO category id (sorted ids, so labels are 0..C-1).
        category_names: label -> category name.
        num_classes: C.

    __getitem__(i) -> (image [3,H,W] float32 normalized, target) with target:
        labels [M] int64, boxes [M,4] float32 normalized (cx,cy,w,h), image_id int,
        orig_size [2] int64 (h,w) of the file, size [2] int64 (h,w) after transforms.
    """

    def __init__(self, image_dir, ann_file, transforms: Optional[Callable] = None, limit: Optional[int] = None):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.transforms = transforms if transforms is not None else to_model_input
        data = _load_json(self.ann_file)
        self._check_records(data)

        self.category_ids = sorted(c["id"] for c in data["categories"])
        names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        self.category_names = [names[c] for c in self.category_ids]
        self.num_classes = len(self.category_ids)
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}

        if not data["images"]:
            raise DatasetError(f"{self.ann_file}: empty split, the file lists no images")
        self._images = {img["id"]: img for img in data["images"]}
        self.ids = [img["id"] for img in data["images"]][:limit]
        self._targets = self._build_targets(data["annotations"], label_of)
        self._check_image_files()

        # pycocotools prints while indexing; the JSON is already parsed, so hand it over instead of re-reading.
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    def _check_records(self, data: dict) -> None:
        f = self.ann_file
        for img in data["images"]:
            _require(img, {"id": (int,), "file_name": (str,), "width": (int,), "height": (int,)}, "image", "images", f)
            if img["width"] <= 0 or img["height"] <= 0:
                raise DatasetError(f"{f}: image id {img['id']} has size {img['width']}x{img['height']}")
        for cat in data["categories"]:
            _require(cat, {"id": (int,)}, "category", "categories", f)
        for ann in data["annotations"]:
            _require(ann, {"id": (int,), "image_id": (int,), "category_id": (int,), "bbox": (list,)},
                     "annotation", "annotations", f)
            box = ann["bbox"]
            if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(v) for v in box):
                raise DatasetError(f"{f}: annotation id {ann['id']} has bbox {box!r:.80}, expected 4 finite "
                                   f"numbers [x, y, w, h]")
        _unique_ids(data["images"], "image", f)
        _unique_ids(data["categories"], "category", f)
        _unique_ids(data["annotations"], "annotation", f)

    def _build_targets(self, annotations: list, label_of: dict) -> dict:
        """image id -> (labels [M] int64, boxes [M,4] float32 xyxy pixels clamped to the image)."""
        f = self.ann_file
        labels, boxes = {i: [] for i in self._images}, {i: [] for i in self._images}
        degenerate = 0
        for ann in annotations:
            img = self._images.get(ann["image_id"])
            if img is None:
                raise DatasetError(f"{f}: annotation id {ann['id']} refers to unknown image id {ann['image_id']}")
            if ann["category_id"] not in label_of:
                raise DatasetError(f"{f}: annotation id {ann['id']} refers to unknown category id "
                                   f"{ann['category_id']}")
            x, y, w, h = ann["bbox"]
            W, H = img["width"], img["height"]
            if w <= 0 or h <= 0:
                degenerate += 1
                continue
            if x >= W or y >= H or x + w <= 0 or y + h <= 0:
                raise DatasetError(f"{f}: annotation id {ann['id']} has bbox {ann['bbox']} entirely outside its "
                                   f"image id {ann['image_id']} ({W}x{H})")
            if ann.get("iscrowd", 0):
                continue  # crowd regions are not instances to predict; COCOeval ignores detections on them
            # a box that sticks out of the image is clamped; a positive box that intersects the image keeps
            # positive area, but float rounding can still collapse a sliver
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
            if x1 <= x0 or y1 <= y0:
                degenerate += 1
                continue
            labels[ann["image_id"]].append(label_of[ann["category_id"]])
            boxes[ann["image_id"]].append((x0, y0, x1, y1))
        if degenerate:
            warnings.warn(f"{f}: dropped {degenerate} degenerate box(es) with width or height <= 0", stacklevel=3)
        return {i: (np.asarray(labels[i], dtype=np.int64), np.asarray(boxes[i], dtype=np.float32).reshape(-1, 4))
                for i in self.ids}

    def _check_image_files(self) -> None:
        missing = [i for i in self.ids if not os.path.isfile(self._image_path(i))]
        if missing:
            i = missing[0]
            raise MissingDataError(f"{len(missing)} of {len(self.ids)} image file(s) listed in {self.ann_file} "
                                   f"are missing; first: image id {i} at {self._image_path(i)}")

    def _image_path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self._images[image_id]["file_name"])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self._images[image_id]
        with Image.open(self._image_path(image_id)) as im:
            im = im.convert("RGB")
        if im.size != (info["width"], info["height"]):
            raise DatasetError(f"{self.ann_file}: image id {image_id} is {info['width']}x{info['height']} in the "
                               f"JSON but {im.size[0]}x{im.size[1]} on disk ({self._image_path(image_id)})")
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
                             data_config.synthetic_max_objects, data_config.synthetic_min_size)
        except ValueError as e:
            raise DatasetError(str(e)) from None
    train = split == "train"
    return CocoDetection(
        root / (data_config.train_images if train else data_config.val_images),
        root / (data_config.train if train else data_config.val),
        transforms=make_transforms(data_config.augment, train=train),
        limit=data_config.limit_train if train else data_config.limit_val,
    )
