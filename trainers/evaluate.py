"""COCO box mAP of a detector (pycocotools' COCOeval, the numbers every DETR paper reports)."""
from __future__ import annotations

import contextlib
import io

import torch

from trainers import accel
from trainers.postprocess import postprocess

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six of COCOeval.stats, in its order


def coco_evaluate(coco_gt, detections: dict, label_to_category: list[int]) -> dict:
    """COCO box metrics of `detections` against `coco_gt` (a pycocotools COCO), on the evaluated images only.

    detections: image_id -> postprocess() dict ('scores' [K], 'labels' [K], 'boxes' [K, 4] xyxy pixels).
    label_to_category: contiguous label -> COCO category id.
    Returns {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'} in [0, 1]. No detections at all gives zeros (COCO's
    loadRes cannot take an empty list); so does a size range without ground truth (COCOeval's -1).
    """
    from pycocotools.cocoeval import COCOeval

    results = []
    for image_id, det in detections.items():
        x0, y0, x1, y1 = det["boxes"].float().cpu().unbind(-1)
        xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], -1).tolist()
        for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": label_to_category[label],
                            "bbox": box, "score": score})
    if not results:
        return {k: 0.0 for k in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(int(i) for i in detections)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: max(float(v), 0.0) for k, v in zip(METRICS, evaluator.stats)}


@torch.no_grad()
def evaluate(model, data_loader, device, label_to_category: list[int], coco_gt, amp: bool = False) -> dict:
    """Run `model` over `data_loader` ((images [B, 3, H, W], padding_mask [B, H, W], targets) batches) and
    return coco_evaluate's metrics of its last decoder layer. bf16 autocast only when amp and on CUDA.
    The model's train/eval mode is restored afterwards."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    amp = amp and device.type == "cuda"
    forward = accel.for_inference(model, amp)  # under amp: bf16 weight copies made once, not per batch
    detections = {}
    for images, mask, targets in data_loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = forward(images.to(device), mask.to(device)).predictions.layer(-1)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        for t, det in zip(targets, postprocess(out["logits"], out["boxes"], orig_sizes)):
            detections[int(t["image_id"])] = det
    model.train(was_training)
    return coco_evaluate(coco_gt, detections, label_to_category)
