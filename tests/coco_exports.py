"""Small COCO exports of the kind labelling tools write, with chosen quirks (handled) and problems (refused).

    ann_file, image_dir = make_export(root, quirks=("missing_area", "cmyk"), problems=("unknown_image",))

The clean export: six images (PNG, one JPEG) of solid colours, each with one or two boxes of three
categories (ids 1..3), every annotation with bbox, area, iscrowd and a polygon segmentation. Each quirk and
each problem is applied to its own record: a quirk edits a record of the clean export (QUIRKS says which
HANDLED counts it makes), a problem adds a record of its own (PROBLEMS says which record and field the
check names), so any combination can be made and checked record by record.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# image id -> (stem, width, height); image 6 is the JPEG
IMAGES = {1: ("a", 32, 24), 2: ("b", 40, 30), 3: ("c", 24, 24), 4: ("d", 36, 28), 5: ("e", 28, 20),
          6: ("f", 30, 26)}
CATEGORIES = {1: "cat", 2: "dog", 3: "bird"}
# annotation id -> (image id, category id, [x, y, w, h]), every box inside its image
ANNOTATIONS = {10: (1, 1, [2, 3, 10, 8]), 11: (1, 2, [12, 4, 14, 12]), 12: (2, 3, [5, 5, 20, 15]),
               13: (2, 1, [1, 1, 6, 6]), 14: (3, 2, [3, 2, 15, 18]), 15: (4, 3, [4, 4, 20, 16]),
               16: (4, 1, [10, 10, 8, 8]), 17: (5, 2, [2, 2, 12, 10]), 18: (6, 3, [6, 5, 18, 16])}

# quirk -> the DataReport.handled it makes (every count of the check, nothing else)
QUIRKS = {
    "missing_area": {"missing_area": 1},  # annotation 10: area must become 10 * 8
    "null_area": {"missing_area": 1},  # annotation 17
    "missing_segmentation": {"missing_segmentation": 1},  # annotation 11
    "crowd_without_segmentation": {"crowd_without_segmentation": 1},  # annotation 12
    "missing_iscrowd": {"missing_iscrowd": 1},  # annotation 13
    "boolean_iscrowd": {"boolean_iscrowd": 1},  # annotation 14: false
    "degenerate_box": {"degenerate_boxes": 1},  # annotation 15: width 0
    "negative_width_box": {"degenerate_boxes": 1},  # annotation 18: width -4
    "box_partly_outside": {"clamped_boxes": 1},  # annotation 16: [30, 20, 12, 12] in 36x28
    "image_without_annotations": {"images_without_annotations": 1},  # image 7 added
    "unused_category": {"unused_categories": 1},  # category 4 added
    "noncontiguous_category_ids": {"noncontiguous_category_ids": 6},  # category 3 becomes 9: 3..8 missing
    "unnamed_category": {"unnamed_categories": 1},  # category 2
    "duplicate_category_name": {"duplicate_category_names": 1},  # category 3 named "cat"
    "grayscale": {"grayscale_images": 1},  # image 1, mode L
    "rgba": {"rgba_images": 1},  # image 2
    "palette": {"palette_images": 1},  # image 5
    "cmyk": {"cmyk_images": 1},  # image 3, a CMYK JPEG
    "16bit": {"16bit_images": 1},  # image 4, a 16-bit grayscale PNG
    "subfolder": {"subfolder_file_names": 1},  # image 6 in nested/deeper/
    "backslash": {"backslash_file_names": 1, "subfolder_file_names": 1},  # image 3 as "sub\\c.png"
    "exif_orientation": {"exif_orientation_ignored": 1},  # image 6: EXIF orientation 6, JSON in stored frame
    "extra_keys": {},  # info, licenses, per-record extras labelling tools add
}

# problem -> (record, field) that its one problem line names
PROBLEMS = {
    "not_an_object_image": ("image at index 0", "record"),
    "string_image_id": ("image id '208'", "id"),
    "float_image_id": ("image id 209.0", "id"),
    "duplicate_image_id": ("image id 1", "id"),
    "missing_file_name": ("image id 201", "file_name"),
    "absolute_file_name": ("image id 202", "file_name"),
    "duplicate_file_name": ("image id 203", "file_name"),
    "missing_width": ("image id 204", "width"),
    "zero_height": ("image id 205", "height"),
    "float_width": ("image id 206", "width"),
    "missing_image": ("image id 210", "file_name"),
    "unreadable_image": ("image id 211", "file_name"),
    "empty_image_file": ("image id 212", "file_name"),
    "size_mismatch": ("image id 213", "width/height"),
    "exif_rotated_size": ("image id 214", "width/height"),
    "unsupported_mode": ("image id 215", "file_name"),
    "string_category_id": ("category id '5'", "id"),
    "duplicate_category_id": ("category id 2", "id"),
    "not_an_object_category": ("category at index 0", "record"),
    "missing_annotation_id": ("annotation at index 0", "id"),
    "string_annotation_id": ("annotation id '101'", "id"),
    "duplicate_annotation_id": ("annotation id 10", "id"),
    "unknown_image": ("annotation id 102", "image_id"),
    "string_image_reference": ("annotation id 103", "image_id"),
    "missing_image_id": ("annotation id 104", "image_id"),
    "unknown_category": ("annotation id 105", "category_id"),
    "missing_category_id": ("annotation id 106", "category_id"),
    "missing_bbox": ("annotation id 107", "bbox"),
    "short_bbox": ("annotation id 108", "bbox"),
    "nan_bbox": ("annotation id 109", "bbox"),
    "inf_bbox": ("annotation id 110", "bbox"),
    "string_bbox": ("annotation id 111", "bbox"),
    "box_outside": ("annotation id 112", "bbox"),
    "iscrowd_two": ("annotation id 113", "iscrowd"),
    "string_iscrowd": ("annotation id 114", "iscrowd"),
    "negative_area": ("annotation id 115", "area"),
}
# the problems only the image files show: the loader finds them when it reads the image, not when it is built
FILE_PROBLEMS = ("unreadable_image", "empty_image_file", "size_mismatch", "exif_rotated_size", "unsupported_mode")


def colour(image_id: int) -> tuple:
    return (40 * image_id % 256, 200 - 20 * image_id, 90 + 15 * image_id)


def _polygon(x, y, w, h, points=4) -> list:
    """A polygon of `points` vertices on the ellipse inside the box (4: the box's corners)."""
    if points == 4:
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    xy = np.stack([x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))], 1)
    return [np.round(xy, 2).ravel().tolist()]


def _annotation(aid, image_id, category_id, box, points=4) -> dict:
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": list(box),
            "area": box[2] * box[3], "iscrowd": 0, "segmentation": _polygon(*box, points)}


def _save(path: Path, w: int, h: int, kind: str = "RGB", fmt: str = "PNG", exif_orientation: int = 0):
    """A solid image of `kind`: RGB, L, RGBA, P, CMYK, I;16 (a ramp over the full 16-bit range), F, or
    junk / empty bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "junk":
        path.write_bytes(b"this is not an image" * 10)
        return
    if kind == "empty":
        path.write_bytes(b"")
        return
    if kind == "I;16":
        ramp = np.linspace(0, 65535, w * h).round().astype(np.uint16).reshape(h, w)
        Image.fromarray(ramp).save(path, fmt)
        return
    rgb = Image.new("RGB", (w, h), colour(1))
    im = {"RGB": rgb, "L": rgb.convert("L"), "RGBA": rgb.convert("RGBA"), "P": rgb.convert("P"),
          "CMYK": rgb.convert("CMYK"), "F": rgb.convert("F")}[kind]
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, fmt, exif=exif)
    else:
        im.save(path, fmt)


def make_export(root, quirks=(), problems=()) -> tuple[Path, Path]:
    """Write a COCO export with `quirks` (keys of QUIRKS) and `problems` (keys of PROBLEMS) into `root`;
    returns (annotation file, image folder)."""
    unknown = [q for q in quirks if q not in QUIRKS] + [p for p in problems if p not in PROBLEMS]
    if unknown:
        raise KeyError(f"no such quirk or problem: {unknown}")
    root = Path(root)
    image_dir, ann_file = root / "images", root / "annotations" / "instances.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    # image id -> how its file is written: kind, format, folder, separator in the JSON, EXIF orientation
    files = {i: dict(kind="RGB", fmt="JPEG" if i == 6 else "PNG", folder="", sep="/", exif=0) for i in IMAGES}
    images = {i: {"id": i, "file_name": "", "width": w, "height": h} for i, (_, w, h) in IMAGES.items()}
    categories = [{"id": c, "name": n, "supercategory": "animal"} for c, n in CATEGORIES.items()]
    anns = {a: _annotation(a, *rec) for a, rec in ANNOTATIONS.items()}
    data = {"images": [], "annotations": [], "categories": categories}
    q = set(quirks)

    if "missing_area" in q:
        del anns[10]["area"]
    if "null_area" in q:
        anns[17]["area"] = None
    if "missing_segmentation" in q:
        del anns[11]["segmentation"]
    if "crowd_without_segmentation" in q:
        anns[12]["iscrowd"] = 1
        del anns[12]["segmentation"]
    if "missing_iscrowd" in q:
        del anns[13]["iscrowd"]
    if "boolean_iscrowd" in q:
        anns[14]["iscrowd"] = False
    if "degenerate_box" in q:
        anns[15]["bbox"][2] = 0
    if "negative_width_box" in q:
        anns[18]["bbox"][2] = -4
    if "box_partly_outside" in q:
        anns[16]["bbox"] = [30, 20, 12, 12]
    if "image_without_annotations" in q:
        images[7] = {"id": 7, "file_name": "", "width": 22, "height": 18}
        files[7] = dict(kind="RGB", fmt="PNG", folder="", sep="/", exif=0)
    if "unused_category" in q:
        categories.append({"id": 4, "name": "fish"})
    if "noncontiguous_category_ids" in q:
        categories[2]["id"] = 9
        for a in anns.values():
            a["category_id"] = 9 if a["category_id"] == 3 else a["category_id"]
    if "unnamed_category" in q:
        del categories[1]["name"]
    if "duplicate_category_name" in q:
        categories[2]["name"] = "cat"
    for quirk, image_id, kind, fmt in (("grayscale", 1, "L", "PNG"), ("rgba", 2, "RGBA", "PNG"),
                                       ("palette", 5, "P", "PNG"), ("cmyk", 3, "CMYK", "JPEG"),
                                       ("16bit", 4, "I;16", "PNG")):
        if quirk in q:
            files[image_id].update(kind=kind, fmt=fmt)
    if "subfolder" in q:
        files[6]["folder"] = "nested/deeper"
    if "backslash" in q:
        files[3].update(folder="sub", sep="\\")
    if "exif_orientation" in q:
        files[6]["exif"] = 6
    if "extra_keys" in q:
        data["info"] = {"description": "exported", "version": "1.0"}
        data["licenses"] = [{"id": 1, "name": "CC"}]
        images[1].update(license=1, flickr_url="", date_captured="2024-01-01")
        anns[10].update(attributes={"occluded": False}, ignore=0)

    for i, spec in files.items():
        stem, ext = IMAGES[i][0] if i in IMAGES else "g", ".jpg" if spec["fmt"] == "JPEG" else ".png"
        images[i]["file_name"] = spec["sep"].join(filter(None, [spec["folder"], stem + ext]))
        _save(image_dir / spec["folder"] / (stem + ext), images[i]["width"], images[i]["height"], spec["kind"],
              spec["fmt"], spec["exif"])
    data["images"] = list(images.values())
    data["annotations"] = list(anns.values())
    for name in PROBLEMS:  # in this order, so that the records inserted at index 0 do not move each other
        if name in problems:
            _add_problem(name, data, image_dir)
    ann_file.write_text(json.dumps(data))
    return ann_file, image_dir


def _add_problem(name: str, data: dict, image_dir: Path) -> None:
    """Add the record(s) of one problem of PROBLEMS to `data` (writing its image file, if it has one)."""
    images, anns, cats = data["images"], data["annotations"], data["categories"]

    def image(image_id, file_name=None, w=20, h=16, kind="RGB", fmt="PNG", write=True, **extra):
        file_name = file_name or f"p{image_id}.{'jpg' if fmt == 'JPEG' else 'png'}"
        if write:
            _save(image_dir / file_name, w, h, kind, fmt, extra.pop("exif", 0))
        images.append(dict({"id": image_id, "file_name": file_name, "width": w, "height": h}, **extra))
        return images[-1]

    def annotation(aid, image_id=1, category_id=1, box=(1, 1, 4, 4), **changes):
        anns.append(dict(_annotation(aid, image_id, category_id, list(box)), **changes))
        return anns[-1]

    if name == "not_an_object_image":
        images.insert(0, ["p0.png", 20, 16])
    elif name == "string_image_id":
        image(208, "p208.png")["id"] = "208"
    elif name == "float_image_id":
        image(209, "p209.png")["id"] = 209.0
    elif name == "duplicate_image_id":
        image(1, "p1dup.png")
    elif name == "missing_file_name":
        del image(201, write=False)["file_name"]
    elif name == "absolute_file_name":
        image(202, str((image_dir / "p202.png").resolve()), write=False)
        _save(image_dir / "p202.png", 20, 16)
    elif name == "duplicate_file_name":
        image(203, _first_file(images), write=False)
    elif name == "missing_width":
        del image(204)["width"]
    elif name == "zero_height":
        image(205, h=0, write=False)
    elif name == "float_width":
        image(206)["width"] = 20.0
    elif name == "missing_image":
        image(210, write=False)
    elif name == "unreadable_image":
        image(211, kind="junk")
    elif name == "empty_image_file":
        image(212, kind="empty")
    elif name == "size_mismatch":
        image(213, w=30, h=16)["width"] = 31
    elif name == "exif_rotated_size":
        img = image(214, w=30, h=20, fmt="JPEG", exif=6)  # stored 30x20, shown rotated as 20x30
        img["width"], img["height"] = 20, 30
    elif name == "unsupported_mode":
        image(215, "p215.tif", kind="F", fmt="TIFF")
    elif name == "string_category_id":
        cats.append({"id": "5", "name": "fox"})
    elif name == "duplicate_category_id":
        cats.append({"id": 2, "name": "wolf"})
    elif name == "not_an_object_category":
        cats.insert(0, "category")
    elif name == "missing_annotation_id":
        del annotation(100)["id"]
        anns.insert(0, anns.pop())
    elif name == "string_annotation_id":
        annotation(101)["id"] = "101"
    elif name == "duplicate_annotation_id":
        annotation(10)
    elif name == "unknown_image":
        annotation(102, image_id=99)
    elif name == "string_image_reference":
        annotation(103, image_id="1")
    elif name == "missing_image_id":
        del annotation(104)["image_id"]
    elif name == "unknown_category":
        annotation(105, category_id=42)
    elif name == "missing_category_id":
        del annotation(106)["category_id"]
    elif name == "missing_bbox":
        del annotation(107)["bbox"]
    elif name == "short_bbox":
        annotation(108)["bbox"] = [1, 2, 3]
    elif name == "nan_bbox":
        annotation(109)["bbox"] = [1, float("nan"), 3, 3]
    elif name == "inf_bbox":
        annotation(110)["bbox"] = [1, 2, float("inf"), 3]
    elif name == "string_bbox":
        annotation(111)["bbox"] = ["1", "2", "3", "4"]
    elif name == "box_outside":
        annotation(112, image_id=1, box=(100, 2, 5, 5))
    elif name == "iscrowd_two":
        annotation(113, iscrowd=2)
    elif name == "string_iscrowd":
        annotation(114, iscrowd="0")
    elif name == "negative_area":
        annotation(115, area=-5)


def _first_file(images: list) -> str:
    return next(img["file_name"] for img in images if isinstance(img, dict) and img.get("id") == 1)


def make_large_export(root, images: int, annotations: int, size=(64, 48), polygon_points=4) -> tuple[Path, Path]:
    """A clean export of `images` images and `annotations` annotations (spread evenly), whose image files are
    hard links to four real JPEGs, each under a name of its own: the JSON and the header reads of a large
    dataset at the disk cost of a small one."""
    root = Path(root)
    image_dir, ann_file = root / "images", root / "annotations" / "instances.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    sources = []
    for k in range(4):
        src = image_dir / f"source{k}.jpg"
        Image.new("RGB", (w, h), colour(k + 1)).save(src, "JPEG")
        sources.append(src)
    rng = np.random.default_rng(0)
    data = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}
    for i in range(1, images + 1):
        name = f"{i:012d}.jpg"
        link = image_dir / name
        if not link.exists():
            link.hardlink_to(sources[i % len(sources)])
        data["images"].append({"id": i, "file_name": name, "width": w, "height": h})
    for a in range(annotations):
        x, y = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        box = [x, y, int(rng.integers(2, w - x + 1)), int(rng.integers(2, h - y + 1))]  # inside: none clamped
        data["annotations"].append(_annotation(a + 1, a % images + 1, int(rng.integers(1, 81)), box,
                                               polygon_points))
    ann_file.write_text(json.dumps(data))
    return ann_file, image_dir
