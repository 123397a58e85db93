"""Batching images of different sizes: zero-pad to a common size and say where the padding is."""
from __future__ import annotations

import torch


def collate(batch: list, pad_multiple: int = 1):
    """[(image [3,H_i,W_i], target)] * B -> (images [B,3,H,W], mask [B,H,W] bool, targets list of B dicts).

    Images are zero-padded at the bottom and right to the largest height and width in the batch, rounded up to
    a multiple of `pad_multiple` (e.g. a backbone stride, so feature maps line up with the mask). mask is True
    on padding, which attention must ignore. Use functools.partial to pick pad_multiple for a DataLoader.
    """
    images, targets = zip(*batch)
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    h, w = -(-h // pad_multiple) * pad_multiple, -(-w // pad_multiple) * pad_multiple
    out = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return out, mask, list(targets)
