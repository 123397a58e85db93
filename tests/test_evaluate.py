"""postprocess ordering/scaling; COCO mAP on a handmade COCO (non-contiguous categories, an empty image)."""
from types import SimpleNamespace

import pytest
import torch
from pycocotools.coco import COCO
from torch import nn

from trainers.evaluate import METRICS, coco_evaluate, evaluate
from trainers.models.output import DecoderPredictions
from trainers.postprocess import postprocess

CATEGORIES = [3, 7, 11, 20]  # label -> category id; 20 has no annotations
IMAGES = {1: (480, 640), 2: (300, 400), 3: (200, 200)}  # id -> (h, w); image 3 has no annotations
ANNOTATIONS = [  # image, category, [x, y, w, h]: small (< 32^2), medium and large objects
    (1, 3, [10, 20, 20, 15]), (1, 7, [100, 100, 60, 50]), (1, 11, [300, 200, 200, 150]),
    (1, 3, [400, 50, 120, 110]), (2, 7, [50, 60, 25, 30]), (2, 3, [150, 100, 70, 80]),
]


@pytest.fixture(scope="module")
def coco_gt():
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": h, "width": w} for i, (h, w) in IMAGES.items()],
        "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORIES],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0} for k, (i, c, box) in enumerate(ANNOTATIONS)],
    }
    coco.createIndex()
    return coco


def perfect_detections(shift=0.0, drop=()):
    """Ground truth as detections (xyxy pixels), optionally shifted right by `shift` x width, minus `drop`."""
    dets = {}
    for image_id in IMAGES:
        rows = [(c, b) for k, (i, c, b) in enumerate(ANNOTATIONS) if i == image_id and k not in drop]
        boxes = torch.tensor([[x + shift * w, y, x + w + shift * w, y + h] for _, (x, y, w, h) in rows]).reshape(-1, 4)
        dets[image_id] = {"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(rows)),
                          "labels": torch.tensor([CATEGORIES.index(c) for c, _ in rows], dtype=torch.int64)}
    return dets


def test_postprocess_topk_order_and_scaling():
    logits = torch.tensor([[[0.0, 3.0], [-1.0, 1.0], [2.0, -5.0]]])  # [1, 3, 2]
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.1, 0.9, 0.2, 0.2]]])
    out = postprocess(logits, boxes, torch.tensor([[100, 200]]), top_k=4)
    assert len(out) == 1 and out[0]["scores"].shape == (4,)
    assert torch.allclose(out[0]["scores"], torch.tensor([3.0, 2.0, 1.0, 0.0]).sigmoid())
    assert out[0]["labels"].tolist() == [1, 0, 1, 0] and out[0]["labels"].dtype == torch.int64
    want = torch.tensor([[80.0, 30.0, 120.0, 70.0],   # query 0 (h=100, w=200)
                         [0.0, 80.0, 40.0, 100.0],    # query 2
                         [0.0, 0.0, 100.0, 50.0],     # query 1
                         [80.0, 30.0, 120.0, 70.0]])  # query 0 again, other class
    assert torch.allclose(out[0]["boxes"], want)
    assert postprocess(logits, boxes, torch.tensor([[100, 200]]), top_k=100)[0]["scores"].shape == (6,)


def test_perfect_detections_give_ap_one(coco_gt):
    metrics = coco_evaluate(coco_gt, perfect_detections(), CATEGORIES)
    assert set(metrics) == set(METRICS)
    for k in METRICS:
        assert metrics[k] == pytest.approx(1.0), k


def test_shifted_and_missing_detections_give_lower_ap(coco_gt):
    perfect = coco_evaluate(coco_gt, perfect_detections(), CATEGORIES)["AP"]
    shifted = coco_evaluate(coco_gt, perfect_detections(shift=0.2), CATEGORIES)
    assert shifted["AP"] < perfect and shifted["AP50"] == pytest.approx(1.0) and shifted["AP75"] < 1.0
    missing = coco_evaluate(coco_gt, perfect_detections(drop=(1, 4)), CATEGORIES)
    assert 0.0 < missing["AP"] < perfect
    for metrics in (shifted, missing):
        assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_only_evaluated_images_count(coco_gt):
    metrics = coco_evaluate(coco_gt, {1: perfect_detections()[1]}, CATEGORIES)
    assert metrics["AP"] == pytest.approx(1.0)


def test_no_detections_give_zeros(coco_gt):
    assert coco_evaluate(coco_gt, {}, CATEGORIES) == {k: 0.0 for k in METRICS}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    assert coco_evaluate(coco_gt, {1: empty, 3: empty}, CATEGORIES) == {k: 0.0 for k in METRICS}


class Oracle(nn.Module):
    """Predicts the ground truth of the image whose id is written in pixel (0, 0, 0)."""

    def __init__(self, num_queries=5):
        super().__init__()
        c = len(CATEGORIES)
        self.table = {}
        for image_id, (h, w) in IMAGES.items():
            logits, boxes = torch.full((num_queries, c), -10.0), torch.full((num_queries, 4), 0.5)
            for q, (_, cat, (x, y, bw, bh)) in enumerate(a for a in ANNOTATIONS if a[0] == image_id):
                logits[q, CATEGORIES.index(cat)] = 10.0
                boxes[q] = torch.tensor([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h])
            self.table[image_id] = (logits, boxes)

    def forward(self, images, mask):
        ids = images[:, 0, 0, 0].long().tolist()
        logits = torch.stack([self.table[i][0] for i in ids])[None]
        boxes = torch.stack([self.table[i][1] for i in ids])[None]
        return SimpleNamespace(predictions=DecoderPredictions(logits, boxes, torch.zeros(*boxes.shape[:3], 8)))


def test_evaluate_runs_model_and_restores_mode(coco_gt):
    def batch(ids):
        images = torch.zeros(len(ids), 3, 8, 8)
        images[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
        targets = [{"image_id": i, "orig_size": torch.tensor(IMAGES[i]), "size": torch.tensor([8, 8])} for i in ids]
        return images, torch.zeros(len(ids), 8, 8, dtype=torch.bool), targets

    model = Oracle().train()
    metrics = evaluate(model, [batch([1, 2]), batch([3])], "cpu", CATEGORIES, coco_gt, amp=True)
    assert model.training
    for k in METRICS:
        assert metrics[k] == pytest.approx(1.0), k
