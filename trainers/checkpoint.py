"""Trial checkpoints: everything needed for an exact resume, written atomically.

A checkpoint also carries the trial config and the dataset's category ids, so a finished model (e.g. a
teacher) can be rebuilt from the file alone with `load_detector`.
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

from trainers.config import ModelConfig


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Write to a temporary file, then rename: a process killed mid-write never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which
        raise ValueError(f"{path}: not a readable detrdistill checkpoint ({e})") from e


def load_detector(path: Path):
    """(detector in eval mode, checkpoint dict) from a trial checkpoint file, or from a transformers
    save_pretrained directory (a pretrained teacher)."""
    from trainers.models import build_detector, from_transformers
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: a directory, but not a transformers save_pretrained folder "
                                    "(no config.json)")
        model = from_transformers(path)
        return model.eval(), {"category_ids": None}
    ckpt = load_checkpoint(path)
    for key in ("model", "model_config", "category_ids"):
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint lacks '{key}'; was it written by detrdistill?")
    saved = dict(ckpt["model_config"])
    if saved.get("family") == "adamixer":  # written before adamixer configs said 0 encoder layers
        saved.pop("encoder_layers", None)
    model = build_detector(ModelConfig.model_validate(saved), len(ckpt["category_ids"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
