"""Decoder-layer mapping: which teacher layer teaches each student layer (the paper's Figure 5 question).

Layers are 0-based; the result has one teacher index per student layer.
  layerwise  s -> s                          (equal depths only; the official code's only case)
  last       s -> L_T - L_S + s              (final layers aligned; for L_S > L_T the first student layers
                                              all learn from teacher layer 0)
  first      s -> s                          (for L_S > L_T the extra student layers learn from the last)
  uniform    evenly spaced, final layers aligned: s -> ceil((s + 1) * L_T / L_S) - 1
  final      every student layer learns from the teacher's last layer
  [t_0, ...] an explicit list
"""
from typing import Sequence, Union


def layer_mapping(strategy: Union[str, Sequence[int]], student_layers: int, teacher_layers: int) -> list[int]:
    """-> [teacher layer index for student layer s, s = 0..student_layers-1]; ValueError if impossible."""
    S, T = student_layers, teacher_layers
    if S < 1 or T < 1:
        raise ValueError(f"layer mapping needs at least one decoder layer each (student {S}, teacher {T})")
    if not isinstance(strategy, str):
        mapping = [int(t) for t in strategy]
        if len(mapping) != S:
            raise ValueError(f"explicit layer mapping has {len(mapping)} entries, the student has {S} decoder layers")
        bad = [t for t in mapping if not 0 <= t < T]
        if bad:
            raise ValueError(f"explicit layer mapping names teacher layers {bad}, the teacher has layers 0..{T - 1}")
        return mapping
    if strategy == "layerwise":
        if S != T:
            raise ValueError(f"'layerwise' mapping needs equal depths (student {S}, teacher {T} decoder layers); "
                             "use 'last', 'uniform', 'first', 'final' or an explicit list")
        return list(range(S))
    if strategy == "last":
        return [max(0, T - S + s) for s in range(S)]
    if strategy == "first":
        return [min(s, T - 1) for s in range(S)]
    if strategy == "uniform":
        return [((s + 1) * T + S - 1) // S - 1 for s in range(S)]  # ceil((s+1) T / S) - 1
    if strategy == "final":
        return [T - 1] * S
    raise ValueError(f"unknown layer mapping strategy {strategy!r}")
