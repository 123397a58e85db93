"""Data: the COCO loader's handling of real-world quirks and bad files, DETR transforms, batching, synthetic data."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from trainers.config import AugmentConfig, DataConfig
from trainers.data import (SYNTHETIC_CLASSES, CocoDetection, DatasetError, build_dataset, collate,
                                       make_synthetic, make_transforms, to_model_input)
from trainers.data.transforms import RandomSizeCrop, RemoveEmptyBoxes


def write_coco(root: Path, images, annotations, categories=None, files=True):
    """images: [(id, w, h)]; annotations: [(id, image_id, category_id, [x, y, w, h], iscrowd)]."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    categories = categories if categories is not None else [{"id": 1, "name": "thing"}]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, w, h in images],
        "annotations": [{"id": a, "image_id": im, "category_id": c, "bbox": b, "area": 1.0, "iscrowd": crowd}
                        for a, im, c, b, crowd in annotations],
        "categories": categories,
    }
    if files:
        for i, w, h in images:
            Image.new("RGB", (w, h), (100, 50, 200)).save(root / "img" / f"{i}.png")
    ann = root / "instances.json"
    ann.write_text(json.dumps(data))
    return root / "img", ann


def xyxy(target):
    """Normalized cxcywh target boxes -> XYXY pixels of the transformed image."""
    h, w = target["size"].tolist()
    cx, cy, bw, bh = target["boxes"].unbind(-1)
    return torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)


# ---------------------------------------------------------------- loader


def test_non_contiguous_category_ids_round_trip(tmp_path):
    cats = [{"id": 42, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    anns = [(1, 1, 42, [1, 1, 5, 5], 0), (2, 1, 3, [2, 2, 5, 5], 0), (3, 1, 7, [3, 3, 5, 5], 0)]
    ds = CocoDetection(*write_coco(tmp_path, [(1, 20, 10)], anns, cats))
    assert ds.category_ids == [3, 7, 42] and ds.num_classes == 3 and ds.category_names == ["a", "b", "c"]
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 0, 1]
    assert [ds.category_ids[label] for label in target["labels"].tolist()] == [42, 3, 7]


def test_target_format_and_image_without_annotations(tmp_path):
    ds = CocoDetection(*write_coco(tmp_path, [(1, 20, 10), (2, 16, 12)], [(1, 1, 1, [2, 4, 6, 2], 0)]))
    assert len(ds) == 2 and ds.ids == [1, 2]
    image, target = ds[0]
    assert image.shape == (3, 10, 20) and image.dtype == torch.float32
    assert target["image_id"] == 1 and target["orig_size"].tolist() == [10, 20] == target["size"].tolist()
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[5 / 20, 5 / 10, 6 / 20, 2 / 10]]))
    image, target = ds[1]
    assert image.shape == (3, 12, 16)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_crowd_annotations_are_not_targets_but_stay_in_coco(tmp_path):
    anns = [(1, 1, 1, [1, 1, 5, 5], 0), (2, 1, 1, [0, 0, 10, 10], 1)]
    ds = CocoDetection(*write_coco(tmp_path, [(1, 20, 10)], anns))
    assert len(ds[0][1]["labels"]) == 1
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 2


def test_border_boxes_are_clamped(tmp_path):
    anns = [(1, 1, 1, [-5, -3, 10, 8], 0), (2, 1, 1, [30, 20, 20, 20], 0)]
    ds = CocoDetection(*write_coco(tmp_path, [(1, 40, 30)], anns))
    torch.testing.assert_close(xyxy(ds[0][1]), torch.tensor([[0.0, 0.0, 5.0, 5.0], [30.0, 20.0, 40.0, 30.0]]))


def test_degenerate_boxes_dropped_and_counted(tmp_path):
    anns = [(1, 1, 1, [1, 1, 0, 5], 0), (2, 1, 1, [1, 1, 5, -1], 0), (3, 1, 1, [1, 1, 5, 5], 0)]
    ds = CocoDetection(*write_coco(tmp_path, [(1, 20, 10)], anns))
    assert ds.handled["degenerate_boxes"] == 2  # for the trial's log and MLflow, not a Python warning
    assert len(ds[0][1]["boxes"]) == 1
    assert ds.coco.getAnnIds(imgIds=[1]) == [3]  # nor are they ground truth nobody could match


def test_limit_keeps_the_first_images(tmp_path):
    ds = CocoDetection(*write_coco(tmp_path, [(5, 8, 8), (2, 8, 8), (9, 8, 8)], []), limit=2)
    assert ds.ids == [5, 2] and len(ds) == 2


def bad_not_json(tmp):
    image_dir, ann = write_coco(tmp, [(1, 8, 8)], [])
    ann.write_text("{not json")
    return image_dir, ann, [str(ann), "not valid JSON"]


def bad_not_coco(tmp):
    image_dir, ann = write_coco(tmp, [(1, 8, 8)], [])
    data = json.loads(ann.read_text())
    del data["categories"]
    ann.write_text(json.dumps(data))
    return image_dir, ann, [str(ann), "categories"]


def bad_wrong_type(tmp):
    image_dir, ann = write_coco(tmp, [(1, 8, 8)], [])
    data = json.loads(ann.read_text())
    data["images"][0]["width"] = "8"
    ann.write_text(json.dumps(data))
    return image_dir, ann, [str(ann), "image id 1", "width"]


def bad_box_outside(tmp):
    image_dir, ann = write_coco(tmp, [(1, 8, 8), (4, 20, 10)], [(17, 4, 1, [25, 2, 3, 3], 0)])
    return image_dir, ann, [str(ann), "annotation id 17", "image id 4", "outside"]


def bad_unknown_image(tmp):
    image_dir, ann = write_coco(tmp, [(1, 8, 8)], [(3, 99, 1, [1, 1, 3, 3], 0)])
    return image_dir, ann, [str(ann), "annotation id 3", "unknown image id 99"]


def bad_unknown_category(tmp):
    image_dir, ann = write_coco(tmp, [(1, 8, 8)], [(3, 1, 5, [1, 1, 3, 3], 0)])
    return image_dir, ann, [str(ann), "annotation id 3", "unknown category id 5"]


def bad_empty_split(tmp):
    image_dir, ann = write_coco(tmp, [], [])
    return image_dir, ann, [str(ann), "no images"]


def bad_missing_image(tmp):
    image_dir, ann = write_coco(tmp, [(1, 8, 8), (2, 8, 8)], [])
    (image_dir / "2.png").unlink()
    return image_dir, ann, ["image id 2", str(image_dir / "2.png")]


def bad_missing_annotation_file(tmp):
    return tmp, tmp / "nope.json", [str(tmp / "nope.json"), "not found"]


@pytest.mark.parametrize("make", [bad_not_json, bad_not_coco, bad_wrong_type, bad_box_outside, bad_unknown_image,
                                  bad_unknown_category, bad_empty_split, bad_missing_image,
                                  bad_missing_annotation_file], ids=lambda f: f.__name__[4:])
def test_bad_data_is_refused_at_construction(tmp_path, make):
    image_dir, ann, expected = make(tmp_path)
    with pytest.raises(DatasetError) as info:
        CocoDetection(image_dir, ann)
    for text in expected:
        assert text in str(info.value)


def test_missing_files_are_file_not_found_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        CocoDetection(tmp_path, tmp_path / "nope.json")


# ---------------------------------------------------------------- transforms


def sample(w=40, h=30, boxes=((2, 3, 12, 9), (20, 10, 38, 28)), labels=(0, 1)):
    """A uint8 image with each box painted in its own colour, and its target."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        img[:, y0:y1, x0:x1] = 10 * (k + 1)
    target = {"image_id": 1, "labels": torch.tensor(labels, dtype=torch.int64),
              "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY",
                                                canvas_size=(h, w)),
              "orig_size": torch.tensor([h, w])}
    return tv_tensors.Image(img), target


def test_flip_mirrors_boxes():
    aug = AugmentConfig(flip=1.0, crop=False, scales=[30], max_size=1000)
    image, target = make_transforms(aug, train=True)(*sample())
    ref_image, ref = to_model_input(*sample())
    torch.testing.assert_close(image, ref_image.flip(-1))
    torch.testing.assert_close(target["boxes"][:, 0], 1 - ref["boxes"][:, 0])
    torch.testing.assert_close(target["boxes"][:, 1:], ref["boxes"][:, 1:])


def test_random_size_crop_clips_boxes_to_the_visible_region():
    crop = v2.Compose([RandomSizeCrop(8, 25), RemoveEmptyBoxes()])
    torch.manual_seed(0)
    for _ in range(50):
        image, target = crop(*sample())
        h, w = image.shape[-2:]
        assert 8 <= h <= 25 and 8 <= w <= 25
        colours = [10 * (k + 1) for k in range(2)]
        visible = [k for k, c in enumerate(colours) if (image[0] == c).any()]
        assert target["labels"].tolist() == visible  # boxes cropped away are gone, with their labels
        for box, k in zip(target["boxes"].tolist(), visible):
            ys, xs = torch.nonzero(image[0] == colours[k], as_tuple=True)
            assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_train_transforms_keep_targets_consistent_and_are_deterministic():
    aug = AugmentConfig(scales=[24, 32, 40], max_size=60, crop_resize=[30, 36], crop_min=12, crop_max=28)
    transforms = make_transforms(aug, train=True)
    outputs = []
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = transforms(*sample())
        outputs.append((image, target))
        h, w = image.shape[-2:]
        assert target["size"].tolist() == [h, w]
        assert min(h, w) in (24, 32, 40) or max(h, w) == 60  # a scale, unless capped by max_size
        assert max(h, w) <= 60
        assert len(target["boxes"]) == len(target["labels"])
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        assert (target["boxes"][:, 2:] > 0).all()
        xy = xyxy(target)
        assert (xy[:, :2] >= -1e-4).all() and (xy[:, 2] <= w + 1e-4).all() and (xy[:, 3] <= h + 1e-4).all()
    assert len({tuple(o[0].shape) for o in outputs}) > 2  # multi-scale and crops happened
    torch.manual_seed(7)
    again = transforms(*sample())
    torch.testing.assert_close(again[0], outputs[7][0])
    torch.testing.assert_close(again[1]["boxes"], outputs[7][1]["boxes"])


def test_eval_transform_size():
    image, target = make_transforms(AugmentConfig(test_size=60, max_size=1000), train=False)(*sample(w=40, h=30))
    assert image.shape == (3, 60, 80) and target["size"].tolist() == [60, 80]
    ref = to_model_input(*sample(w=40, h=30))[1]["boxes"]
    torch.testing.assert_close(target["boxes"], ref)  # normalized boxes do not change under resize
    image, _ = make_transforms(AugmentConfig(test_size=60, max_size=70), train=False)(*sample(w=40, h=30))
    assert image.shape == (3, 52, 70)  # longer side capped, shorter 52.5 rounded
    assert abs(image.mean(dim=(1, 2))).max() < 3  # normalized, not 0..255


# ---------------------------------------------------------------- batching


def test_collate_pads_bottom_right_and_masks_padding():
    a, b = torch.ones(3, 10, 12), 2 * torch.ones(3, 14, 8)
    images, mask, targets = collate([(a, {"i": 0}), (b, {"i": 1})])
    assert images.shape == (2, 3, 14, 12) and mask.shape == (2, 14, 12) and mask.dtype == torch.bool
    assert [t["i"] for t in targets] == [0, 1]
    assert not mask[0, :10, :12].any() and mask[0, 10:].all() and mask[1, :, 8:].all() and not mask[1, :, :8].any()
    assert (images[0, :, :10, :12] == 1).all() and (images[0, :, 10:] == 0).all()
    assert (images[1, :, :, :8] == 2).all() and (images[1, :, :, 8:] == 0).all()
    images, mask, _ = collate([(a, {}), (b, {})], pad_multiple=8)
    assert images.shape == (2, 3, 16, 16) and mask[:, 14:].all()


# ---------------------------------------------------------------- synthetic data


def files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic_by_seed(tmp_path):
    make_synthetic(tmp_path / "a", train=6, val=2, seed=3, image_size=64)
    make_synthetic(tmp_path / "b", train=6, val=2, seed=3, image_size=64)
    make_synthetic(tmp_path / "c", train=6, val=2, seed=4, image_size=64)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 6 + 2 + 2 + 1 and a == b
    assert a["train/000000.jpg"] != c["train/000000.jpg"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), train=60, val=5, seed=0, image_size=128)


def test_synthetic_is_a_coco_dataset_with_all_classes_and_sizes(synthetic_root):
    ds = CocoDetection(synthetic_root / "train", synthetic_root / "annotations" / "instances_train.json")
    assert len(ds) == 60 and ds.category_names == list(SYNTHETIC_CLASSES) and ds.num_classes == 10
    image, target = ds[0]
    assert image.shape[0] == 3 and max(image.shape[1:]) == 128 and len(target["labels"]) >= 1
    anns = ds.coco.dataset["annotations"]
    assert {a["category_id"] for a in anns} == set(ds.category_ids)
    sides = np.array([max(a["bbox"][2:]) for a in anns])
    assert (sides < 16).sum() >= 10 and (sides > 48).sum() >= 10  # small (< 1/8 image) and large (> 3/8)
    assert all(1 <= len(ds.coco.getAnnIds(imgIds=[i])) <= 8 for i in ds.ids)


def test_build_dataset_generates_once_and_refuses_other_parameters(tmp_path):
    aug = AugmentConfig(scales=[48], max_size=64, crop=False, test_size=48)
    cfg = DataConfig(root=tmp_path / "syn", synthetic_train=4, synthetic_val=2, synthetic_image_size=64,
                     augment=aug, limit_train=3)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 3 and len(val) == 2
    assert min(val[0][0].shape[1:]) == 48
    marker = tmp_path / "syn" / "synthetic.json"
    stamp = marker.stat().st_mtime_ns
    build_dataset(cfg, "train")
    assert marker.stat().st_mtime_ns == stamp  # reused, not regenerated
    with pytest.raises(DatasetError, match="delete it"):
        build_dataset(cfg.model_copy(update={"synthetic_seed": 1}), "train")
    (tmp_path / "empty").mkdir()  # an empty folder is filled, not refused
    assert len(build_dataset(cfg.model_copy(update={"root": tmp_path / "empty"}), "val")) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a synthetic dataset"):
        build_dataset(cfg.model_copy(update={"root": tmp_path / "other"}), "train")


def test_ensure_synthetic_reuses_and_refuses_other_parameters(tmp_path):
    from trainers.data import ensure_synthetic
    root = tmp_path / "easy"
    ensure_synthetic(root, train=3, val=1, seed=0, image_size=48, max_objects=2, min_size=0.3, progress=None)
    stamp = (root / "train" / "000000.jpg").stat().st_mtime_ns
    ensure_synthetic(root, train=3, val=1, seed=0, image_size=48, max_objects=2, min_size=0.3, progress=None)
    assert (root / "train" / "000000.jpg").stat().st_mtime_ns == stamp  # reused, not regenerated
    with pytest.raises(ValueError, match=r"min_size: 0.3 on disk, 0.08 wanted"):
        ensure_synthetic(root, train=3, val=1, seed=0, image_size=48, max_objects=2, progress=None)


def test_fewer_synthetic_classes(tmp_path):
    """synthetic_classes C: only the first C shape classes, as categories and as labels; the same seed draws the
    same images otherwise (a box for box same layout, labels from a smaller range); another C is another dataset."""
    from trainers.data import ensure_synthetic
    few = make_synthetic(tmp_path / "few", train=20, val=2, seed=0, image_size=48, classes=3)
    data = json.loads((few / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(SYNTHETIC_CLASSES[:3])
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3}
    assert json.loads((few / "synthetic.json").read_text())["classes"] == 3
    dataset = build_dataset(DataConfig(root=few, synthetic_train=20, synthetic_val=2, synthetic_image_size=48,
                                       synthetic_classes=3), "train")
    assert dataset.num_classes == 3
    with pytest.raises(ValueError, match=r"classes: 3 on disk, 10 wanted"):
        ensure_synthetic(few, train=20, val=2, seed=0, image_size=48, progress=None)
    with pytest.raises(ValueError, match="classes <= 10"):
        make_synthetic(tmp_path / "none", train=1, val=1, image_size=48, classes=11)
