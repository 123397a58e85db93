"""Time of the dataset check (trainers/data/check.py) on a COCO-val-sized export.

    python benchmarks/data_check.py                        # 5000 images, 36781 annotations (COCO val2017)
    python benchmarks/data_check.py --images 118287 --annotations 860001   # COCO train2017's counts

The export is tests/coco_exports.make_large_export: every annotation with a box, an area and a polygon of
--polygon-points vertices (40 makes a file of about COCO val2017's instances JSON size), 80 categories, and
an image file for each record: a hard link to one of four real 640x480 JPEGs under its own name, so the header
reads are real file opens and parses (from the page cache: a cold disk or a network file system is slower).
Printed, in seconds: each part of check_coco (reading the JSON, its rules, the image headers), the whole of
check_coco, dataset_check_cached the first time (hashing + check) and the second (from the cache), and the
loader's construction (CocoDetection: the JSON rules and a stat of each image file).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from coco_exports import make_large_export  # noqa: E402
from trainers.data.check import (Findings, check_coco, check_image_files, check_records,  # noqa: E402
                                 dataset_check_cached, load_json)
from trainers.data.coco import CocoDetection  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--annotations", type=int, default=36781)
    ap.add_argument("--polygon-points", type=int, default=40)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ann_file, image_dir = make_large_export(tmp, args.images, args.annotations, size=(640, 480),
                                                polygon_points=args.polygon_points)
        print(f"export: {args.images} images, {args.annotations} annotations, "
              f"{ann_file.stat().st_size / 1e6:.1f} MB of JSON")
        findings = Findings(ann_file)
        data, t_json = timed(load_json, ann_file, findings)
        records, t_rules = timed(check_records, data, findings)
        _, t_headers = timed(check_image_files, records.images, image_dir, findings)
        assert not findings.lines, findings.lines
        report, t_check = timed(check_coco, ann_file, image_dir)
        assert report.ok, report.problems
        _, t_first = timed(dataset_check_cached, ann_file, image_dir, Path(tmp) / "cache")
        _, t_cached = timed(dataset_check_cached, ann_file, image_dir, Path(tmp) / "cache")
        _, t_loader = timed(CocoDetection, image_dir, ann_file)
        for name, t in [("json_load_s", t_json), ("json_rules_s", t_rules), ("image_headers_s", t_headers),
                        ("check_coco_s", t_check), ("cached_first_s", t_first), ("cached_again_s", t_cached),
                        ("loader_build_s", t_loader)]:
            print(f"{name}: {t:.3f}")


if __name__ == "__main__":
    main()
