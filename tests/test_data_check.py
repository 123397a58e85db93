"""The dataset check (trainers/data/check.py) on generated exports: each problem refused in one line naming the
file, the record and the field, by the check and by the loader alike; each quirk counted, trained on and
evaluated; conversions and repairs against values worked out by hand; the cache."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from coco_exports import FILE_PROBLEMS, PROBLEMS, QUIRKS, make_export, make_large_export
from trainers.config import AugmentConfig, DataConfig
from trainers.data import CocoDetection, DatasetError, build_dataset
from trainers.data import check
from trainers.data.check import HANDLED, IMAGE_MODES, check_coco, dataset_check_cached
from trainers.data.coco import to_rgb
from trainers.evaluate import coco_evaluate

IMAGE_KEYS = set(IMAGE_MODES.values()) - {None} | {"exif_orientation_ignored"}  # counted from headers only


def identity(image, target):
    return image, target


def test_clean_export_has_nothing_to_report(tmp_path):
    report = check_coco(*make_export(tmp_path))
    assert report.ok and report.problems == [] and report.handled == {}
    assert (report.images, report.annotations) == (6, 9)


def test_every_key_is_documented():
    made = {k for counts in QUIRKS.values() for k in counts}
    assert made == set(HANDLED)  # every handled quirk has an export that makes it
    assert IMAGE_KEYS <= set(HANDLED)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_each_problem_is_one_line_and_the_loader_refuses_it_in_the_same_words(tmp_path, problem):
    ann_file, image_dir = make_export(tmp_path, problems=[problem])
    report = check_coco(ann_file, image_dir)
    record, field = PROBLEMS[problem]
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(f"{ann_file}: {record}: {field}: ")
    assert "\n" not in report.problems[0] and not report.ok

    try:  # the JSON rules and the file's existence are checked when the dataset is built...
        ds = CocoDetection(image_dir, ann_file, transforms=identity)
    except DatasetError as e:
        assert str(e) == report.problems[0]
        return
    image_id = int(record.split()[-1])  # ...the file's header and contents when the image is read
    with pytest.raises(DatasetError) as info:
        ds[ds.ids.index(image_id)]
    assert str(info.value) == report.problems[0]


def test_all_problems_at_once_one_line_each(tmp_path):
    ann_file, image_dir = make_export(tmp_path, problems=list(PROBLEMS))
    problems = check_coco(ann_file, image_dir).problems
    assert len(problems) == len(PROBLEMS)
    for record, field in PROBLEMS.values():
        assert sum(p.startswith(f"{ann_file}: {record}: {field}: ") for p in problems) == 1, (record, field)
    with pytest.raises(DatasetError) as info:  # the loader lists every JSON problem, not only the first
        CocoDetection(image_dir, ann_file)
    missing_image = 1  # reported by the check with the JSON's problems, by the loader once they are fixed
    assert len(str(info.value).splitlines()) == len(PROBLEMS) - len(FILE_PROBLEMS) - missing_image


def data_config(root, ann_file, image_dir) -> DataConfig:
    ann, images = ann_file.relative_to(root).as_posix(), image_dir.relative_to(root).as_posix()
    return DataConfig(format="coco", root=root, train=ann, val=ann, train_images=images, val_images=images,
                      augment=AugmentConfig(scales=[32, 40], max_size=48, crop=True, crop_resize=[24, 32],
                                            crop_min=16, crop_max=24, test_size=32))


def ground_truth_detections(ds) -> dict:
    """Every non-crowd ground-truth box of the evaluation index as a detection (xyxy pixels, labels)."""
    label = {c: i for i, c in enumerate(ds.category_ids)}
    dets = {}
    for image_id in ds.ids:
        anns = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"]]
        dets[image_id] = {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                                                dtype=torch.float32).reshape(-1, 4),
                          "scores": torch.ones(len(anns)),
                          "labels": torch.tensor([label[a["category_id"]] for a in anns], dtype=torch.int64)}
    return dets


@pytest.mark.parametrize("quirk", list(QUIRKS))
def test_each_quirk_is_counted_trained_on_and_evaluated(tmp_path, quirk, one_thread):
    ann_file, image_dir = make_export(tmp_path, quirks=[quirk])
    report = check_coco(ann_file, image_dir)
    assert report.problems == []
    assert report.handled == QUIRKS[quirk]

    cfg = data_config(tmp_path, ann_file, image_dir)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.handled == {k: n for k, n in QUIRKS[quirk].items() if k not in IMAGE_KEYS}
    torch.manual_seed(0)
    for i in range(len(train)):
        image, target = train[i]
        assert image.dtype == torch.float32 and image.shape[0] == 3 and torch.isfinite(image).all()
        assert len(target["boxes"]) == len(target["labels"])
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    metrics = coco_evaluate(val.coco, ground_truth_detections(val), val.category_ids)
    assert metrics["AP"] == pytest.approx(1.0)  # the ground truth, repaired, still matches itself


def test_all_quirks_at_once(tmp_path, one_thread):
    ann_file, image_dir = make_export(tmp_path, quirks=list(QUIRKS))
    report = check_coco(ann_file, image_dir)
    assert report.ok and set(report.handled) == set(HANDLED)
    val = build_dataset(data_config(tmp_path, ann_file, image_dir), "val")
    assert all(val[i][0].shape[0] == 3 for i in range(len(val)))
    assert coco_evaluate(val.coco, ground_truth_detections(val), val.category_ids)["AP"] == pytest.approx(1.0)


def test_repairs_by_hand(tmp_path):
    ann_file, image_dir = make_export(tmp_path, quirks=["missing_area", "null_area", "missing_iscrowd",
                                                        "boolean_iscrowd", "box_partly_outside",
                                                        "crowd_without_segmentation", "degenerate_box"])
    ds = CocoDetection(image_dir, ann_file, transforms=identity)
    anns = ds.coco.anns
    assert anns[10]["area"] == 10 * 8 and anns[17]["area"] == 12 * 10  # [2, 3, 10, 8] and [2, 2, 12, 10]
    assert anns[13]["iscrowd"] == 0 and anns[14]["iscrowd"] == 0 and type(anns[14]["iscrowd"]) is int
    assert anns[16]["bbox"] == [30, 20, 6, 8]  # [30, 20, 12, 12] in a 36x28 image
    assert anns[12]["iscrowd"] == 1 and 15 not in anns  # the crowd is kept for COCOeval, the w=0 box is not
    _, target = ds[ds.ids.index(4)]  # anns 15 (dropped) and 16 (clamped)
    assert target["boxes"].tolist() == [[30, 20, 36, 28]]
    _, target = ds[ds.ids.index(2)]  # ann 12 is a crowd region: not a target
    assert target["labels"].tolist() == [0]
    raw = json.loads(ann_file.read_text())["annotations"]
    assert "area" not in raw[0] and raw[6]["bbox"] == [30, 20, 12, 12]  # the file itself is left alone


def pixels(tmp_path, im: Image.Image, suffix=".png") -> np.ndarray:
    """The uint8 RGB pixels the loader makes of `im` saved as a one-image export."""
    path = tmp_path / f"x{suffix}"
    im.save(path)
    (tmp_path / "x.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": path.name, "width": im.width, "height": im.height}],
        "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    image, _ = CocoDetection(tmp_path, tmp_path / "x.json", transforms=identity)[0]
    return image.permute(1, 2, 0).numpy()


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 257, 32768, 65535]], dtype=np.uint16)
    rgb = pixels(tmp_path, Image.fromarray(values))
    want = [0, 0, 1, 128, 255]  # round(v * 255 / 65535), worked out by hand
    assert (rgb == np.array(want, dtype=np.uint8)[None, :, None]).all()
    as_int32 = to_rgb(Image.fromarray(values.astype(np.int32)))  # mode "I", as older PIL opens 16-bit PNGs
    assert np.asarray(as_int32)[0, :, 0].tolist() == want
    big_endian = to_rgb(Image.fromarray(values.astype(">u2")))
    assert np.asarray(big_endian)[0, :, 0].tolist() == want


def test_cmyk_grayscale_rgba_and_palette_conversions(tmp_path):
    cmyk = [(255, 0, 0, 0), (0, 0, 0, 128), (0, 128, 0, 64), (0, 0, 0, 0)]
    im = Image.new("CMYK", (4, 1))
    for x, p in enumerate(cmyk):
        im.putpixel((x, 0), p)
    rgb = pixels(tmp_path, im, ".tif").astype(int)[0]
    # R = 255 (1 - C/255) (1 - K/255), likewise G with M and B with Y
    want = [[255 * (1 - c / 255) * (1 - k / 255) for c in (cy, m, y)] for cy, m, y, k in cmyk]
    assert np.abs(rgb - np.array(want)).max() <= 1
    assert np.abs(rgb[:2] - [[0, 255, 255], [127, 127, 127]]).max() <= 1

    gray = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8))
    assert pixels(tmp_path, gray)[0].tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    assert pixels(tmp_path, rgba)[0].tolist() == [[10, 20, 30]] * 2  # alpha dropped, colour kept
    palette = Image.new("RGB", (2, 1), (255, 0, 0)).convert("P")
    assert pixels(tmp_path, palette)[0].tolist() == [[255, 0, 0]] * 2


def test_exif_orientation_does_not_rotate(tmp_path):
    ann_file, image_dir = make_export(tmp_path, quirks=["exif_orientation"])
    image, target = CocoDetection(image_dir, ann_file, transforms=identity)[5]
    assert target["image_id"] == 6 and image.shape[1:] == (26, 30)  # as stored (h 26, w 30), not turned


def test_a_truncated_image_passes_the_header_check_and_is_refused_when_read(tmp_path):
    ann_file, image_dir = make_export(tmp_path)
    path = image_dir / "f.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (26, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:-400])
    assert check_coco(ann_file, image_dir).ok  # headers only: the cost of checking without decoding
    ds = CocoDetection(image_dir, ann_file)
    with pytest.raises(DatasetError) as info:
        ds[5]
    assert str(info.value).startswith(f"{ann_file}: image id 6: file_name: {path} cannot be read as an image: ")


def edit(ann_file, change):
    data = json.loads(ann_file.read_text())
    change(data)
    ann_file.write_text(json.dumps(data))


@pytest.mark.parametrize("section", ["images", "categories"])
def test_an_empty_list_is_one_line_not_one_per_reference(tmp_path, section):
    ann_file, image_dir = make_export(tmp_path)
    edit(ann_file, lambda d: d.update({section: []}))
    assert check_coco(ann_file, image_dir).problems == [f"{ann_file}: {section}: empty, the file lists no {section}"]


@pytest.mark.parametrize("content, words", [(None, "not found"), ("{nope", "not valid JSON"),
                                            ("[]", "not a COCO instances file"),
                                            ('{"images": [], "annotations": []}', "categories: missing"),
                                            ('{"images": {}, "annotations": [], "categories": []}',
                                             "images: {} (an object), expected a list")])
def test_files_that_are_not_instances_files(tmp_path, content, words):
    ann_file = tmp_path / "instances.json"
    if content is not None:
        ann_file.write_text(content)
    report = check_coco(ann_file, tmp_path)
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{ann_file}: ")
    assert words in report.problems[0]


def test_a_large_export_is_counted_and_its_repeated_problems_capped(tmp_path):
    ann_file, image_dir = make_large_export(tmp_path, images=300, annotations=3000)
    report = check_coco(ann_file, image_dir)
    assert report.ok and (report.images, report.annotations) == (300, 3000)

    def spoil(data):
        for a in data["annotations"][:35]:
            a["category_id"] = 999
        for a in data["annotations"][100:103]:
            del a["area"]
    edit(ann_file, spoil)
    report = check_coco(ann_file, image_dir)
    assert len(report.problems) == check.MAX_LINES + 1
    assert report.problems[-1] == f"{ann_file}: ... and {35 - check.MAX_LINES} more annotation category_id problem(s)"
    assert report.handled == {"missing_area": 3}


def test_cached_check(tmp_path, monkeypatch):
    ann_file, image_dir = make_export(tmp_path, quirks=["missing_area"])
    first = dataset_check_cached(ann_file, image_dir, tmp_path / "cache")
    assert first.ok and first.handled == {"missing_area": 1}

    def no_second_check(*args):
        raise AssertionError("checked again")
    monkeypatch.setattr(check, "check_coco", no_second_check)
    copy = tmp_path / "copy.json"
    copy.write_bytes(ann_file.read_bytes())
    again = dataset_check_cached(copy, image_dir, tmp_path / "cache")
    assert again.handled == first.handled and again.ann_file == str(copy)  # the same bytes: not read again
    monkeypatch.undo()

    edit(ann_file, lambda d: d["annotations"].append({"id": 1, "image_id": 1, "category_id": 77, "bbox": [1, 1, 2, 2]}))
    failed = dataset_check_cached(ann_file, image_dir, tmp_path / "cache")
    assert len(failed.problems) == 1 and "unknown category id 77" in failed.problems[0]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # a refused export is checked again next time
