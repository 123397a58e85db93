"""What decides a trial's result besides its config: the version of the method's code and its dataset's identity.

The orchestrator names a trial by a hash of its config together with these (orchestrator.spec.trial_hash), so a
trial finished under other code or other data is trained again instead of being reused. Plain Python: spec
validation hashes trials and must not import torch (trainers.data's package imports it, so the synthetic
generator's version lives here too).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from trainers.config import DataConfig

METHOD_VERSION = 1
"""Bump on any change to what a trial computes for the same config: a loss or a distillation term, a model,
matching, augmentation, evaluation, the optimiser's schedule. Every stored trial is then trained again when an
experiment asks for it. A change in how fast or where a trial runs (RuntimeConfig) is no reason to bump."""

GENERATOR_VERSION = 1
"""The synthetic dataset generator's (trainers/data/synthetic.py): bump when it draws other images or
annotations for the same parameters. Datasets on disk made by another version are refused, and trials on them
are trained again."""

_CHUNK = 1 << 20
_file_hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: each file read once


def dataset_identity(data: DataConfig) -> dict:
    """What the config does not say about a trial's data. Synthetic: the generator's version (its parameters are
    config fields). COCO: the sha256 of the train and val annotation files (a relative root is taken from the
    working directory); ValueError when one does not exist."""
    if data.format == "synthetic":
        return {"synthetic": GENERATOR_VERSION}
    return {"coco": {split: file_sha256(data.root / getattr(data, split)) for split in ("train", "val")}}


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read again only when its size or modification time changes."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ValueError(f"annotation file {path} does not exist; a trial's identity includes its content") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]
