"""Trial checkpoints: everything needed for an exact resume, written atomically.

A checkpoint also carries the trial config and the dataset's category ids, so a finished model (e.g. a
teacher) can be rebuilt from the file alone with `load_detector`.
"""
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

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
        id2label = json.loads((path / "config.json").read_text()).get("id2label") or {}
        names = [id2label[k] for k in sorted(id2label, key=int)] if len(id2label) == model.num_classes else None
        return model.eval(), {"category_ids": None, "label_names": names}
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


def align_classes(teacher: nn.Module, teacher_names: list[str], dataset_names: list[str], label_map: dict,
                  where: str) -> nn.Module:
    """A pretrained teacher's classes put in the dataset's order, by name: its class heads keep the rows of the
    dataset's categories (label_map: dataset category name -> the teacher's name for it, where they differ),
    so its logits are [.., C_dataset] in the student's label order. ValueError listing the categories the
    teacher has no class for."""
    row = {name: i for i, name in enumerate(teacher_names)}
    wanted = [label_map.get(name, name) for name in dataset_names]
    missing = [f"{d!r}" + (f" (as {w!r})" if w != d else "") for d, w in zip(dataset_names, wanted) if w not in row]
    if missing:
        raise ValueError(f"{where}: the teacher has no class for {len(missing)} of the dataset's categories: "
                         f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; its classes are "
                         f"{', '.join(map(repr, teacher_names[:10]))}{' ...' if len(teacher_names) > 10 else ''}. "
                         "Map dataset category names to the teacher's with teacher.label_map")
    index = torch.tensor([row[w] for w in wanted])
    if torch.equal(index, torch.arange(len(teacher_names))):
        return teacher
    for name, module in list(teacher.named_modules()):
        if name.split(".")[-1] == "class_head":
            head = nn.Linear(module.in_features, len(index)).to(module.weight.device, module.weight.dtype)
            with torch.no_grad():
                head.weight.copy_(module.weight[index])
                head.bias.copy_(module.bias[index])
            parent = teacher.get_submodule(name.rsplit(".", 1)[0]) if "." in name else teacher
            setattr(parent, name.split(".")[-1], head)
    teacher.num_classes = len(index)
    return teacher
