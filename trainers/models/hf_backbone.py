"""transformers ResNet backbones <-> our torchvision backbones.

transformers' ResNet (ResNetConfig with downsample_in_bottleneck=False, downsample_in_first_stage=False) is
torchvision's ResNet v1.5 under other names: the stride sits in the 3x3 conv of a bottleneck (the first 3x3
of a basic block), the shortcut is a strided 1x1 conv + BN, the stem a 7x7/2 conv, BN, ReLU, 3x3/2 max-pool.
So the weights map one to one; only the names change. Detectors built on timm backbones already use
torchvision's names and pass through unchanged.
"""
import functools
import re
from typing import Union

from torch import Tensor, nn

# torchvision depth and width of each ResNet, in transformers' terms
_RESNETS = {
    "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
    "resnet34": dict(layer_type="basic", depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512]),
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]),
    "resnet101": dict(layer_type="bottleneck", depths=[3, 4, 23, 3], hidden_sizes=[256, 512, 1024, 2048]),
}

# torchvision name prefix -> our Backbone's (see backbone._resnet_stages: stage 0 = (stem + layer1, layer2))
_TORCHVISION_TO_BACKBONE = [("conv1.", "stages.0.0.0."), ("bn1.", "stages.0.0.1."), ("layer1.", "stages.0.0.4."),
                            ("layer2.", "stages.0.1."), ("layer3.", "stages.1."), ("layer4.", "stages.2.")]

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def hf_resnet_config(name: str, out_features=("stage4",)):
    """The transformers ResNetConfig with torchvision `name`'s architecture (resnet18/34/50/101)."""
    from transformers import ResNetConfig
    if name not in _RESNETS:
        raise ValueError(f"no transformers ResNet equivalent for {name!r}; known: {sorted(_RESNETS)}")
    return ResNetConfig(embedding_size=64, downsample_in_bottleneck=False, downsample_in_first_stage=False,
                        hidden_act="relu", num_channels=3, out_features=list(out_features), **_RESNETS[name])


def config_field(config, key: str, default=None):
    """A field of a transformers config object or of its dict form."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def backbone_name_from_hf(backbone_config) -> str:
    """Our backbone name ("resnet50", ...) for a transformers ResNetConfig (or timm backbone config, object
    or dict), or a ValueError saying why it has no torchvision equivalent."""
    get = functools.partial(config_field, backbone_config)
    model_type = get("model_type")
    if model_type == "timm_backbone":
        name = get("backbone")
        if name not in _RESNETS:
            raise ValueError(f"timm backbone {name!r} is not one of {sorted(_RESNETS)}")
        if get("output_stride") not in (None, 32):
            raise ValueError(f"dilated timm backbone (output_stride {get('output_stride')}) is not supported")
        return name
    if model_type != "resnet":
        raise ValueError(f"backbone model_type {model_type!r} is not supported (only ResNet)")
    if get("downsample_in_bottleneck") or get("downsample_in_first_stage") or get("embedding_size") != 64 \
            or get("hidden_act") != "relu" or get("num_channels", 3) != 3:
        raise ValueError("transformers ResNet with a non-torchvision stem/stride layout is not supported: "
                         f"{backbone_config}")
    arch = dict(layer_type=get("layer_type"), depths=list(get("depths")), hidden_sizes=list(get("hidden_sizes")))
    for name, spec in _RESNETS.items():
        if spec == arch:
            return name
    raise ValueError(f"transformers ResNet {arch} matches none of {sorted(_RESNETS)}")


def _hf_to_torchvision_name(key: str) -> str:
    """One transformers ResNet state_dict key -> torchvision's (e.g. encoder.stages.2.layers.0.layer.1.
    convolution.weight -> layer3.0.conv2.weight); KeyError when it is not a backbone weight."""
    m = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", key)
    if m:
        return ("conv1." if m[1] == "convolution" else "bn1.") + m[2]
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(layer\.(\d+)|shortcut)\.(convolution|normalization)"
                     r"\.(\w+)", key)
    if not m:
        raise KeyError(key)
    stage, block, part, conv, kind, field = m.groups()
    prefix = f"layer{int(stage) + 1}.{block}."
    if part == "shortcut":
        return prefix + ("downsample.0." if kind == "convolution" else "downsample.1.") + field
    i = int(conv) + 1
    return prefix + (f"conv{i}." if kind == "convolution" else f"bn{i}.") + field


def hf_resnet_to_torchvision(hf_backbone: Union[nn.Module, dict]) -> dict[str, Tensor]:
    """A transformers ResNetBackbone/ResNetModel (or its state_dict) -> torchvision resnet state_dict names
    (conv1.weight, layer1.0.bn1.running_var, ...), BN statistics included. A state_dict already in
    torchvision's names (a timm backbone) passes through. `num_batches_tracked` and heads are dropped."""
    state = hf_backbone.state_dict() if isinstance(hf_backbone, nn.Module) else dict(hf_backbone)
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key.startswith(("fc.", "classifier.", "pooler.")):
            continue
        if key.startswith(("conv1.", "bn1.", "layer")):  # torchvision / timm names already
            out[key] = value
            continue
        try:
            out[_hf_to_torchvision_name(key)] = value
        except KeyError:
            raise ValueError(f"unexpected key {key!r} in a transformers ResNet state_dict") from None
    return out


def torchvision_to_backbone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision resnet names -> our Backbone's (stages.0.0.* = stem + layer1, stages.0.1 = layer2,
    stages.1 = layer3, stages.2 = layer4)."""
    out = {}
    for key, value in state.items():
        for tv, ours in _TORCHVISION_TO_BACKBONE:
            if key.startswith(tv):
                out[ours + key[len(tv):]] = value
                break
    return out


def convert_hf_resnet(hf_backbone: Union[nn.Module, dict]) -> dict[str, Tensor]:
    """A transformers ResNet backbone (module or state_dict) -> a state_dict for our `Backbone`, frozen BN
    buffers included (load it with `Backbone(...).load_state_dict(..)`)."""
    return torchvision_to_backbone(hf_resnet_to_torchvision(hf_backbone))


# -- shared by the detector converters (hf_conditional_detr.py, hf_deformable_detr.py) -----------------------
HF_BACKBONE_PREFIX = "model.backbone.model."


def backbone_state_from_hf(hf_state: dict) -> dict:
    """The backbone part of a transformers detector's state_dict, renamed to ours ("backbone.stages...")."""
    n = len(HF_BACKBONE_PREFIX)
    hf_backbone = {k[n:]: v for k, v in hf_state.items() if k.startswith(HF_BACKBONE_PREFIX)}
    return {"backbone." + k: v for k, v in convert_hf_resnet(hf_backbone).items()}


def rename_key(key: str, renames) -> str:
    """The first (regex pattern, replacement) in `renames` matching the start of `key`; KeyError if none."""
    for pattern, repl in renames:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            return new
    raise KeyError(key)


def load_exactly(model, state: dict, unknown: list, source: str):
    """Load `state` into `model`; every parameter and buffer must be filled and nothing left over."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected or unknown:
        raise ValueError(f"transformers {source} weights do not fill our model: missing {missing}, "
                         f"unexpected {unexpected}, unmapped transformers keys {unknown}")
    return model.eval()
