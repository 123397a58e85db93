"""Checks of a COCO-format detection export against everything training and COCO evaluation will read.

Each rule is written once, here. `check_coco` runs the rules over a whole export (the annotation JSON and the
header of every image) before anything trains; the loader (coco.py) runs the same JSON rules on the file it
trains from, so both refuse in the same words and repair in the same way.

Refused, one line each, `FILE: <record> id <id>: <field>: <what is wrong>`: whatever training or pycocotools
would crash on, or would silently read wrong (see `check_records` and `check_image_files`). Handled, counted
in DataReport.handled under the keys of HANDLED: quirks of labelling tools' exports that training and
COCOeval (iouType "bbox") cope with, some after the repair COCO tools would make.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError

HANDLED = {
    "missing_area": "annotations without an area (or a null one): the box's w*h, as COCO tools compute it",
    "missing_iscrowd": "annotations without iscrowd (or a null one): taken as 0",
    "boolean_iscrowd": "iscrowd written as true / false: taken as 1 / 0",
    "missing_segmentation": "annotations without a segmentation: box evaluation does not read it",
    "crowd_without_segmentation": "crowd regions without a segmentation: their box is the region COCOeval uses",
    "degenerate_boxes": "boxes of width or height <= 0 (in the image): dropped from training and evaluation",
    "clamped_boxes": "boxes partly outside their image: clamped to it for training and evaluation",
    "images_without_annotations": "images without annotations: background for training, false positives for AP",
    "unused_categories": "categories no annotation uses: the model has a class for each all the same",
    "noncontiguous_category_ids": "ids missing between the smallest and the largest category id",
    "unnamed_categories": "categories without a name: named by their id",
    "duplicate_category_names": "categories named like an earlier one",
    "subfolder_file_names": "file names with sub-folders of the image folder",
    "backslash_file_names": "file names with Windows '\\' separators: read as '/'",
    "grayscale_images": "1-bit and grayscale images (alpha dropped): gray RGB",
    "rgba_images": "RGBA images: alpha dropped",
    "palette_images": "palette images: their colours",
    "cmyk_images": "CMYK images: converted to RGB",
    "16bit_images": "16-bit grayscale images: scaled to 8 bits (65535 -> 255), not clipped",
    "exif_orientation_ignored": "images with an EXIF orientation: read as stored, the frame COCO annotations are in",
}

# PIL mode -> the HANDLED key of its conversion to 8-bit RGB (None: nothing to convert); other modes are refused
IMAGE_MODES = {"RGB": None, "1": "grayscale_images", "L": "grayscale_images", "LA": "grayscale_images",
               "RGBA": "rgba_images", "RGBa": "rgba_images", "RGBX": "rgba_images", "P": "palette_images",
               "PA": "palette_images", "CMYK": "cmyk_images", "I;16": "16bit_images", "I;16L": "16bit_images",
               "I;16B": "16bit_images", "I;16N": "16bit_images", "I": "16bit_images"}

MAX_LINES = 20  # per record kind and field: a faulty export repeats one mistake in every record
CHECK_VERSION = 1  # part of the cache key: a report made under older rules is not reused


class DatasetError(ValueError):
    """The data on disk is not usable; the message says which file / id and what is wrong."""


class MissingDataError(DatasetError, FileNotFoundError):
    """A file the dataset needs does not exist."""


@dataclass
class DataReport:
    """What `check_coco` found. problems: one line each, refused (empty: the export can be trained on);
    handled: HANDLED key -> how many records have that quirk (nonzero counts only); images, annotations: the
    numbers of records in the file."""
    ann_file: str
    problems: list = field(default_factory=list)
    handled: dict = field(default_factory=dict)
    images: int = 0
    annotations: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line for a log: the counts and every handled quirk."""
        quirks = ", ".join(f"{k} {n}" for k, n in self.handled.items()) or "none"
        verdict = f"{len(self.problems)} problem line(s)" if self.problems else "ok"
        return (f"{self.ann_file}: {verdict}; {self.images} images, {self.annotations} annotations; "
                f"handled: {quirks}")


def line(ann_file, record: Optional[str], field_name: Optional[str], message: str) -> str:
    """One problem: `FILE: <record>: <field>: <message>`, the parts that are None left out."""
    return ": ".join(str(p) for p in (ann_file, record, field_name, message) if p is not None)


class Findings:
    """Problem lines (at most MAX_LINES per record kind and field) and handled counts, as the rules find them."""

    def __init__(self, ann_file):
        self.ann_file = str(ann_file)
        self.lines, self.shown, self.more, self.handled = [], Counter(), Counter(), Counter()
        self.only_missing = True  # every problem so far is a file that does not exist

    def problem(self, record: Optional[str], field_name: Optional[str], message: str, missing: bool = False):
        self.only_missing &= missing
        kind = ((record or "").split(" ")[0], field_name)
        if self.shown[kind] < MAX_LINES:
            self.shown[kind] += 1
            self.lines.append(line(self.ann_file, record, field_name, message))
        else:
            self.more[kind] += 1

    def count(self, key: str, n: int = 1):
        self.handled[key] += n

    def problems(self) -> list:
        return self.lines + [f"{self.ann_file}: ... and {n} more {what} {name} problem(s)"
                             for (what, name), n in self.more.items()]

    def report(self, images: int = 0, annotations: int = 0) -> DataReport:
        return DataReport(self.ann_file, self.problems(), {k: n for k, n in self.handled.items() if n},
                          images, annotations)

    def raise_problems(self):
        """Raise every problem found so far as one DatasetError (MissingDataError if all are missing files)."""
        if self.lines or self.more:
            raise (MissingDataError if self.only_missing else DatasetError)("\n".join(self.problems()))


@dataclass
class Records:
    """The records training and evaluation use, as check_records leaves them."""
    images: dict  # id -> image record (file_name with '/' separators), in file order
    categories: list  # category records sorted by id, each with a name
    annotations: list  # copies, repaired: area and iscrowd filled in, boxes clamped, degenerate ones left out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _show(v) -> str:
    """A JSON value and its JSON type, for a message: '8' (a string)."""
    kind = {str: "string", bool: "boolean", int: "integer", float: "number", list: "list", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({'an' if kind[0] in 'aeiou' else 'a'} {kind})"


def _label(what: str, record, index: int) -> str:
    """How a message names a record: by its id when it has one, else by its place in the list."""
    if isinstance(record, dict) and "id" in record:
        return f"{what} id {record['id']!r:.40}"
    return f"{what} at index {index}"


def load_json(ann_file: Path, findings: Findings) -> Optional[dict]:
    """The parsed COCO instances file, or None after reporting why it is not one."""
    reported = len(findings.lines)
    if not ann_file.is_file():
        findings.problem(None, None, "not found", missing=True)
        return None
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        findings.problem(None, None, f"not valid JSON: {e}")
        return None
    if not isinstance(data, dict):
        findings.problem(None, None, f"not a COCO instances file: the top level is {_show(data)}, expected an "
                                     f"object with images, annotations and categories")
        return None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            findings.problem(None, key, "missing, so this is not a COCO instances file")
        elif not isinstance(data[key], list):
            findings.problem(None, key, f"{_show(data[key])}, expected a list")
    return None if len(findings.lines) > reported else data


def _check_id(record: dict, what: str, name: str, index: int, seen: dict, findings: Findings) -> bool:
    """Whether the record has an integer id no earlier record of its list has; remembered in `seen`."""
    if "id" not in record:
        findings.problem(name, "id", "missing")
        return False
    rid = record["id"]
    if not _is_int(rid):
        findings.problem(name, "id", f"{_show(rid)}, expected an integer")
        return False
    if rid in seen:
        findings.problem(name, "id", f"duplicate: the {what} at index {seen[rid]} has the same id")
        return False
    seen[rid] = index
    return True


def _records(data: dict, section: str, what: str, findings: Findings, required: bool = True):
    """(index, record, its name in messages, whether its id is usable) of each object in data[section]. An
    entry that is not an object, a missing, non-integer or repeated id, and (if `required`) an empty list are
    reported here."""
    seen = {}
    for index, record in enumerate(data[section]):
        if not isinstance(record, dict):
            findings.problem(f"{what} at index {index}", "record", f"{_show(record)}, expected an object")
            continue
        name = _label(what, record, index)
        yield index, record, name, _check_id(record, what, name, index, seen, findings)
    if required and not data[section]:
        findings.problem(None, section, f"empty, the file lists no {section}")


def _file_name(img: dict, name: str, findings: Findings) -> Optional[str]:
    """The image's path relative to the image folder, with '/' separators, or None after reporting it."""
    value = img.get("file_name")
    if "file_name" not in img:
        findings.problem(name, "file_name", "missing")
        return None
    if not isinstance(value, str) or not value.strip():
        findings.problem(name, "file_name", f"{_show(value)}, expected a path relative to the image folder")
        return None
    if "\\" in value:
        findings.count("backslash_file_names")
        value = value.replace("\\", "/")
    if value.startswith("/") or re.match(r"[A-Za-z]:", value):
        findings.problem(name, "file_name", f"{value!r} is absolute, expected a path relative to the image folder")
        return None
    value = posixpath.normpath(value)
    if "/" in value:
        findings.count("subfolder_file_names")
    return value


def _ids_in(records: list) -> set:
    """Every hashable id the records have, valid or not."""
    return {r["id"] for r in records if isinstance(r, dict) and isinstance(r.get("id"), (int, float, str))}


def _reference(ann: dict, key: str, what: str, usable: dict, present: set, name: str, findings: Findings):
    """The id ann[key] refers to if its record is usable, else None. A reference to a record the file has but
    that was refused, or into an empty list, is not reported again."""
    if key not in ann:
        findings.problem(name, key, "missing")
        return None
    value = ann[key]
    if not _is_int(value):
        findings.problem(name, key, f"{_show(value)}, expected an integer")
        return None
    if value in usable:
        return value
    if present and value not in present:
        findings.problem(name, key, f"unknown {what} id {value}")
    return None


def check_records(data: dict, findings: Findings) -> Records:
    """Every JSON rule over the images, categories and annotations of a loaded instances file."""
    images, files = {}, {}
    for index, img, name, ok in _records(data, "images", "image", findings):
        for key in ("width", "height"):
            if key not in img:
                findings.problem(name, key, "missing")
                ok = False
            elif not _is_int(img[key]) or img[key] <= 0:
                findings.problem(name, key, f"{_show(img[key])}, expected a positive integer number of pixels")
                ok = False
        file_name = _file_name(img, name, findings)
        if file_name is not None and file_name in files:
            findings.problem(name, "file_name", f"{file_name!r} is also the file of the image at index "
                                                f"{files[file_name]}")
            ok = False
        elif file_name is not None:
            files[file_name] = index
        if ok and file_name is not None:
            images[img["id"]] = dict(img, file_name=file_name)

    categories, names = {}, set()
    for _, cat, name, ok in _records(data, "categories", "category", findings):
        cat_name = cat.get("name")
        if not isinstance(cat_name, str) or not cat_name.strip():
            findings.count("unnamed_categories")
            cat_name = str(cat.get("id"))
        elif cat_name in names:
            findings.count("duplicate_category_names")
        names.add(cat_name)
        if ok:
            categories[cat["id"]] = dict(cat, name=cat_name)

    image_ids, category_ids = _ids_in(data["images"]), _ids_in(data["categories"])
    annotations, used_images, used_categories = [], set(), set()
    for _, ann, name, ok in _records(data, "annotations", "annotation", findings, required=False):
        image_id = _reference(ann, "image_id", "image", images, image_ids, name, findings)
        category_id = _reference(ann, "category_id", "category", categories, category_ids, name, findings)
        used_images.add(image_id)
        used_categories.add(category_id)
        ok &= image_id is not None and category_id is not None

        box = ann.get("bbox")
        if "bbox" not in ann:
            findings.problem(name, "bbox", "missing")
            ok = False
        elif not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            findings.problem(name, "bbox", f"{_show(box)}, expected 4 finite numbers [x, y, w, h]")
            ok = False

        crowd = ann.get("iscrowd")
        if crowd is None:
            findings.count("missing_iscrowd")
            crowd = 0
        elif isinstance(crowd, bool):
            findings.count("boolean_iscrowd")
            crowd = int(crowd)
        elif not (_is_int(crowd) and crowd in (0, 1)):
            findings.problem(name, "iscrowd", f"{_show(crowd)}, expected 0 or 1")
            ok = False

        area = ann.get("area")
        if area is None:
            findings.count("missing_area")
        elif not _is_number(area) or area < 0:
            findings.problem(name, "area", f"{_show(area)}, expected a number >= 0 (or none: then it is the "
                                           f"box's w*h)")
            ok = False

        if not ann.get("segmentation"):
            findings.count("crowd_without_segmentation" if crowd else "missing_segmentation")

        if not ok:
            continue
        box = _fit_box(box, images[image_id], name, findings)
        if box is not None:
            annotations.append(dict(ann, bbox=box, iscrowd=crowd, area=box[2] * box[3] if area is None else area))

    findings.count("images_without_annotations", len(set(images) - used_images))
    findings.count("unused_categories", len(set(categories) - used_categories))
    if categories:
        findings.count("noncontiguous_category_ids", max(categories) - min(categories) + 1 - len(categories))
    return Records(images, [categories[c] for c in sorted(categories)], annotations)


def _fit_box(box: list, img: dict, name: str, findings: Findings) -> Optional[list]:
    """The [x, y, w, h] box clamped to its image, or None if it is dropped (degenerate) or refused (outside)."""
    x, y, w, h = box
    W, H = img["width"], img["height"]
    if w <= 0 or h <= 0:
        findings.count("degenerate_boxes")
        return None
    if x >= W or y >= H or x + w <= 0 or y + h <= 0:
        findings.problem(name, "bbox", f"{box} lies entirely outside its image id {img['id']} ({W}x{H})")
        return None
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:  # a sliver that float rounding collapsed
        findings.count("degenerate_boxes")
        return None
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return box
    findings.count("clamped_boxes")
    return [x0, y0, x1 - x0, y1 - y0]


def missing_file(path) -> str:
    return f"{path} does not exist"


def unreadable(path, error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return f"{path} is not an image PIL can identify"
    return f"{path} cannot be read as an image: {error}"


def unsupported_mode(path, mode: str) -> str:
    return (f"{path} has PIL mode {mode}, which training has no conversion to 8-bit RGB for; save it as RGB, "
            f"grayscale, RGBA, palette, CMYK or 16-bit grayscale")


def exif_orientation(im: Image.Image) -> Optional[int]:
    """The EXIF orientation tag of an opened image, if its header has one (JPEG keeps EXIF in the header;
    other formats may only parse it by decoding the image, which a header check must not do)."""
    return im.getexif().get(0x0112) if "exif" in im.info else None


def size_mismatch(img: dict, size: tuple, path, orientation: Optional[int] = None) -> Optional[str]:
    """Why the image's size on disk (w, h) is not the JSON's, or None if it is."""
    w, h = size
    if (w, h) == (img["width"], img["height"]):
        return None
    message = f"{img['width']}x{img['height']} in the JSON but {w}x{h} on disk ({path})"
    if (h, w) == (img["width"], img["height"]) and orientation in (5, 6, 7, 8):
        message += ("; the JSON has the size after its EXIF rotation, but COCO annotations are in the stored "
                    "frame: save the images rotated, or export the annotations in the stored frame")
    return message


def check_image_files(images: dict, image_dir: Path, findings: Findings, headers: bool = True) -> None:
    """Each image exists; with `headers`, PIL identifies it (its header only: nothing is decoded) as the size
    the JSON says, in a mode training converts to 8-bit RGB."""
    for image_id, img in images.items():
        name, path = f"image id {image_id}", os.path.join(image_dir, img["file_name"])
        if not headers:
            if not os.path.isfile(path):
                findings.problem(name, "file_name", missing_file(path), missing=True)
            continue
        try:
            with Image.open(path) as im:
                size, mode, orientation = im.size, im.mode, exif_orientation(im)
        except FileNotFoundError:
            findings.problem(name, "file_name", missing_file(path), missing=True)
            continue
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL raises each of these
            findings.problem(name, "file_name", unreadable(path, e))
            continue
        mismatch = size_mismatch(img, size, path, orientation)
        if mismatch:
            findings.problem(name, "width/height", mismatch)
        if mode not in IMAGE_MODES:
            findings.problem(name, "file_name", unsupported_mode(path, mode))
        elif IMAGE_MODES[mode]:
            findings.count(IMAGE_MODES[mode])
        if orientation not in (None, 1):
            findings.count("exif_orientation_ignored")


def check_coco(ann_file, image_dir) -> DataReport:
    """Every problem and quirk of a COCO instances file and the image folder its file names are relative to."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    findings = Findings(ann_file)
    data = load_json(ann_file, findings)
    if data is None:
        return findings.report()
    records = check_records(data, findings)
    check_image_files(records.images, image_dir, findings)
    return findings.report(len(data["images"]), len(data["annotations"]))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_check_cached(ann_file, image_dir, cache_dir) -> DataReport:
    """check_coco, remembered in `cache_dir` under the sha256 of the annotation file's bytes and the image
    folder's path, so that the same export is checked once. Only a passed check is remembered: a refused
    export is usually fixed on disk (images copied, files re-saved) without a change to its JSON."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    try:
        digest = _sha256(ann_file)
    except OSError:
        return check_coco(ann_file, image_dir)
    key = hashlib.sha256(f"{CHECK_VERSION}\0{digest}\0{image_dir.resolve()}".encode()).hexdigest()
    path = Path(cache_dir) / f"data-check-{key[:32]}.json"
    try:
        report = DataReport(**json.loads(path.read_text()))
        report.ann_file = str(ann_file)  # the same bytes may sit at another path
        return report
    except (OSError, ValueError, TypeError):  # not checked yet, or a torn write
        pass
    report = check_coco(ann_file, image_dir)
    if report.ok:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(report)))
        os.replace(tmp, path)  # readers in other processes see the old file or the whole new one
    return report
