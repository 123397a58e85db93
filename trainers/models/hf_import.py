"""Our detector from a transformers one: the model object, or a directory written by its save_pretrained."""
import importlib
import json
from pathlib import Path
from typing import Union

from torch import nn

# transformers model_type -> (its ForObjectDetection class name, our converter as module:function)
_CONVERTERS = {
    "conditional_detr": ("ConditionalDetrForObjectDetection",
                         "trainers.models.hf_conditional_detr:convert_conditional_detr"),
    "deformable_detr": ("DeformableDetrForObjectDetection",
                        "trainers.models.hf_deformable_detr:convert_deformable_detr"),
}


HF_EXTRA = "pip install 'detrdistill[hf]' (transformers and timm)"


def _import_transformers(what: str, timm: bool = False):
    """transformers (and timm, for a checkpoint on a timm backbone), or an ImportError naming the extra."""
    try:
        import transformers
        if timm:
            import timm  # noqa: F401  (transformers builds a timm backbone through it)
    except ImportError as e:
        raise ImportError(f"{what} needs the optional dependencies transformers and timm ({e.name} is missing): "
                          f"{HF_EXTRA}") from e
    return transformers


def _load_pretrained(directory: Path) -> nn.Module:
    """The ForObjectDetection model saved in `directory`, read from local files only."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a transformers save_pretrained directory)")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in _CONVERTERS:
        raise ValueError(f"{directory}: model_type {model_type!r} is not supported; known: {sorted(_CONVERTERS)}")
    transformers = _import_transformers(f"the transformers checkpoint {directory}",
                                        timm=bool(config.get("use_timm_backbone")))
    cls = getattr(transformers, _CONVERTERS[model_type][0])
    return cls.from_pretrained(str(directory), local_files_only=True)


def from_transformers(model_or_dir: Union[nn.Module, str, Path]) -> nn.Module:
    """A transformers ConditionalDetrForObjectDetection / DeformableDetrForObjectDetection (or the directory
    its save_pretrained wrote) -> our detector with the same weights, in eval mode."""
    model = model_or_dir if isinstance(model_or_dir, nn.Module) else _load_pretrained(Path(model_or_dir))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _CONVERTERS or type(model).__name__ != _CONVERTERS[model_type][0]:
        wanted = ", ".join(cls for cls, _ in _CONVERTERS.values())
        raise ValueError(f"cannot convert {type(model).__name__} (model_type {model_type!r}); expected one of {wanted}")
    module_name, function = _CONVERTERS[model_type][1].split(":")
    convert = getattr(importlib.import_module(module_name), function)  # imported lazily: transformers-free core
    return convert(model).eval()
