"""The detector contract: what every DETR-family detector returns and accepts.

Distillation code is written once against these types, never per family.

Shapes: L decoder layers, B images, N queries, C classes (sigmoid/focal, no "no-object" logit), d hidden size,
S = sum_j H_j * W_j flattened positions over the feature levels.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class QueryGroup:
    """A detector's initial queries, as learned parameters (no batch dimension).

    Which fields a family uses:
      conditional_detr: position [N, d] (the query embedding; content starts at zero)
      deformable_detr:  position [N, d] and content [N, d] (the two halves of its query embedding);
                        reference points come from the *receiving* detector's reference-point layer
      adamixer:         content [N, d] and boxes [N, 4] (normalized cxcywh)
    A group passed to another detector's `queries=` must carry the fields that family reads.
    """
    position: Optional[Tensor] = None
    content: Optional[Tensor] = None
    boxes: Optional[Tensor] = None

    def detach(self) -> "QueryGroup":
        return QueryGroup(*(t.detach() if t is not None else None for t in (self.position, self.content, self.boxes)))

    @property
    def num_queries(self) -> int:
        return next(t.shape[0] for t in (self.position, self.content, self.boxes) if t is not None)


def cross_group_mask(sizes: list[int], device=None) -> Optional[Tensor]:
    """Query groups of `sizes` run through one decoder together: [N, N] bool, True where queries n and m
    are in different groups (self-attention between them is blocked, so each group's result is what it
    would be alone); None for a single group."""
    if len(sizes) < 2:
        return None
    return ~torch.block_diag(*[torch.ones(n, n, dtype=torch.bool, device=device) for n in sizes])


@dataclass
class DecoderPredictions:
    """Per-decoder-layer predictions of one query group."""
    logits: Tensor  # [L, B, N, C] classification logits (sigmoid)
    boxes: Tensor   # [L, B, N, 4] normalized cxcywh in [0, 1]
    hidden: Tensor  # [L, B, N, d] decoder layer outputs (after the layer's final norm)

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]

    def float(self) -> "DecoderPredictions":
        """Logits and boxes as float32 (hidden as it is): what losses and matching read, even under bf16
        autocast; made once here, so that the matcher and the loss do not each cast the same tensors."""
        return DecoderPredictions(self.logits.float(), self.boxes.float(), self.hidden)

    def split(self, sizes: list[int]) -> list["DecoderPredictions"]:
        """Query groups run together (queries concatenated in this order) -> one DecoderPredictions each."""
        parts = (t.split(sizes, 2) for t in (self.logits, self.boxes, self.hidden))
        return [DecoderPredictions(*p) for p in zip(*parts)]

    def layer(self, l: int) -> dict:
        """One layer as the {'logits', 'boxes'} dict the criterion and post-processing take."""
        return {"logits": self.logits[l], "boxes": self.boxes[l]}


@dataclass
class DetectorOutput:
    """Everything a detector's forward pass returns.

    predictions: the detector's own queries, every decoder layer; predictions.layer(-1) is the detection.
    features:    the multi-scale maps that enter the transformer (after the input projection), each
                 [B, d, H_j, W_j]; feature distillation works on these.
    masks:       padding masks of those maps, each [B, H_j, W_j] bool, True = padding.
    memory:      encoder output [B, S, d] (for a family without an encoder, the flattened features).
    queries:     the detector's own initial queries (learned parameters, not detached).
    extra:       predictions of the extra query group passed as `queries=`, every layer, or None.
    """
    predictions: DecoderPredictions
    features: list[Tensor]
    masks: list[Tensor]
    memory: Tensor
    queries: QueryGroup
    extra: Optional[DecoderPredictions] = None
    aux: dict = field(default_factory=dict)  # family-specific extras (e.g. reference points), for debugging

    @property
    def logits(self) -> Tensor:
        return self.predictions.logits

    @property
    def boxes(self) -> Tensor:
        return self.predictions.boxes

    @property
    def hidden(self) -> Tensor:
        return self.predictions.hidden


def tensors_in(obj):
    """Every tensor in a (nested) output - DetectorOutput, DecoderPredictions, lists, tuples, dicts - in order."""
    if torch.is_tensor(obj):
        yield obj
    elif is_dataclass(obj):
        for f in fields(obj):
            yield from tensors_in(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


def map_tensors(fn, obj):
    """The same (nested) output - DetectorOutput, DecoderPredictions, lists, tuples, dicts - with every tensor
    replaced by fn(tensor); everything else as it is."""
    if torch.is_tensor(obj):
        return fn(obj)
    if is_dataclass(obj):
        return type(obj)(**{f.name: map_tensors(fn, getattr(obj, f.name)) for f in fields(obj)})
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, item) for item in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    return obj
