"""torchvision backbones with frozen batch norm, returning the last few stages' feature maps."""
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
import torchvision
import torchvision.ops.misc
from torch import Tensor, nn

from trainers.pretrained import imagenet_file

# Output channels of the three stages used as transformer inputs (strides 8, 16, 32).
STAGE_CHANNELS = {
    "resnet18": [128, 256, 512],
    "resnet34": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "resnet101": [512, 1024, 2048],
    "mobilenet_v2": [32, 96, 1280],
}
# Channels at stride 4 (C2, AdaMixer's finest level), and where the first stage's modules reach stride 4.
C2_CHANNELS = {"resnet18": 64, "resnet34": 64, "resnet50": 256, "resnet101": 256, "mobilenet_v2": 24}
C2_SPLIT = {"resnet": 1, "mobilenet_v2": 4}  # stages[0][:split] ends at stride 4 (resnet: stem + layer1)


def _resnet_stages(net: nn.Module) -> list[nn.Module]:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    return [nn.Sequential(stem, net.layer2), net.layer3, net.layer4]


def dilate_last_stage(layer4: nn.Sequential) -> None:
    """DC5 (as torchvision's replace_stride_with_dilation, which refuses BasicBlock): the last stage keeps
    stride 16 instead of 32, its later 3x3 convolutions dilated by 2 to keep their receptive field."""
    first = layer4[0]
    strided = first.conv2 if hasattr(first, "conv3") else first.conv1  # Bottleneck strides in conv2
    strided.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block in layer4:
        for conv in (m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)):
            if conv is not strided:
                conv.dilation, conv.padding = (2, 2), (2, 2)


def _mobilenet_stages(net: nn.Module) -> list[nn.Module]:
    f = net.features  # blocks 0-6 end at stride 8, 7-13 at stride 16, 14-18 at stride 32 (1280 channels)
    return [f[:7], f[7:14], f[14:]]


class FrozenBatchNorm2d(torchvision.ops.misc.FrozenBatchNorm2d):
    """torchvision's frozen batch norm (the same buffers and state_dict) as one multiply-add. Its scale and
    shift depend only on buffers that never train, so they are kept (not saved) and computed again only when a
    state_dict is loaded, not in every forward as torchvision does (7 kernels a layer; a ResNet-50 has 53). In
    the input's dtype: under bf16 autocast the output stays bf16, where torchvision's is promoted to float32
    and then cast back by the next convolution; the bf16 scale and shift are kept too, so that a bf16 forward
    casts nothing. Buffers changed in place by hand need refresh()."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        for name, init in (("scale", torch.ones), ("shift", torch.zeros)):
            self.register_buffer(name, init(num_features), persistent=False)
            self.register_buffer(f"{name}_bf16", init(num_features, dtype=torch.bfloat16), persistent=False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        self.scale.copy_(scale)
        self.shift.copy_(self.bias - self.running_mean * scale)
        self.scale_bf16.copy_(self.scale)
        self.shift_bf16.copy_(self.shift)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> x * scale + shift per channel, in x's dtype."""
        scale, shift = (self.scale_bf16, self.shift_bf16) if x.dtype == torch.bfloat16 else (self.scale, self.shift)
        return torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1))


class Backbone(nn.Module):
    """Image -> the last `num_levels` (1 to 3) of the stride-8/16/32 feature maps, with their padding masks;
    with `with_c2` the stride-4 map comes first too (AdaMixer's C2-C5).

    norm "frozen_bn" (DETR's recipe for a pretrained backbone): batch norm statistics and affine parameters
    are buffers, because detection batches are too small for batch statistics, and the stem and first stage
    are never trained. norm "batch_norm" (a backbone trained from scratch, where frozen statistics would be
    the identity and leave a deep network unnormalised): ordinary batch norm, every stage trained.
    dilation: DC5, the last stage at stride 16 (dilate_last_stage).
    """

    def __init__(self, name: str, num_levels: int, weights: Union[Path, str, None] = None, train: bool = True,
                 norm: str = "frozen_bn", dilation: bool = False, with_c2: bool = False):
        super().__init__()
        if name not in STAGE_CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; known: {sorted(STAGE_CHANNELS)}")
        frozen = norm == "frozen_bn"
        net = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d)
        if weights is not None:  # a file, or "imagenet": torchvision's ImageNet weights from torch hub's cache
            load_backbone_weights(net, imagenet_file(name) if str(weights) == "imagenet" else weights)
        if dilation:
            if not name.startswith("resnet"):
                raise ValueError(f"backbone_dilation (DC5) needs a resnet backbone, not {name}")
            dilate_last_stage(net.layer4)
        stages = _resnet_stages(net) if name.startswith("resnet") else _mobilenet_stages(net)
        self.stages = nn.ModuleList(stages)
        self.num_levels = min(num_levels, 3)
        self.channels = STAGE_CHANNELS[name][3 - self.num_levels:]
        self.c2_split = C2_SPLIT["resnet" if name.startswith("resnet") else name] if with_c2 else None
        if with_c2:
            self.channels = [C2_CHANNELS[name]] + self.channels
        for pname, p in self.named_parameters():
            trainable = train and not (frozen and name.startswith("resnet") and pname.startswith("stages.0.0."))
            p.requires_grad_(trainable)

    def forward(self, images: Tensor, mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """images [B, 3, H, W], mask [B, H, W] (True = padding) -> [(features [B, C_j, H_j, W_j], mask_j)]."""
        outs, x = [], images
        for i, stage in enumerate(self.stages):
            if i == 0 and self.c2_split is not None:  # the same modules, run in two parts to keep C2
                c2 = stage[:self.c2_split](x)
                x = stage[self.c2_split:](c2)
            else:
                x = stage(x)
            outs.append(x)
        outs = outs[3 - self.num_levels:]
        if self.c2_split is not None:
            outs = [c2] + outs
        return [(f, F.interpolate(mask[None].float(), size=f.shape[-2:])[0].bool()) for f in outs]


def load_backbone_weights(net: nn.Module, path: Path) -> None:
    """Load a torchvision classification state_dict (e.g. resnet50-0676ba61.pth) from a local file.
    The classifier head may be missing or extra; anything else missing is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    head = ("fc.", "classifier.")
    missing = [k for k in missing if not k.startswith(head)]
    unexpected = [k for k in unexpected if not k.startswith(head)]
    if missing or unexpected:
        raise ValueError(f"{path}: not a matching torchvision backbone state_dict "
                         f"(missing {missing[:5]}..., unexpected {unexpected[:5]}...)")
