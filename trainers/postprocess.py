"""Detector output -> scored detections in original-image pixels (Deformable DETR's PostProcess).

With sigmoid classification every (query, class) pair is a candidate detection: the top-k over all N*C
scores are kept, so one query may yield several detections of different classes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from trainers.box_ops import cxcywh_to_xyxy


@torch.no_grad()
def postprocess(logits: Tensor, boxes: Tensor, orig_sizes: Tensor, top_k: int = 100) -> list[dict]:
    """logits [B, N, C], boxes [B, N, 4] normalized cxcywh, orig_sizes [B, 2] (h, w) ->
    per image {'scores' [K], 'labels' [K] int64, 'boxes' [K, 4] xyxy in pixels}, scores descending,
    K = min(top_k, N * C)."""
    b, n, c = logits.shape
    scores, flat = logits.float().sigmoid().reshape(b, n * c).topk(min(top_k, n * c), dim=1)
    query, labels = flat // c, flat % c
    xyxy = torch.gather(cxcywh_to_xyxy(boxes.float()), 1, query[..., None].expand(-1, -1, 4))
    h, w = orig_sizes.to(xyxy).unbind(1)
    xyxy = xyxy * torch.stack([w, h, w, h], dim=1)[:, None, :]
    return [{"scores": s, "labels": l, "boxes": x} for s, l, x in zip(scores, labels, xyxy)]
