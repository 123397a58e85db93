"""Feature-level KD baselines designed for CNN detectors (docs/method.md, "Baselines"): FitNet, FGD, MGD.

They distill the multi-scale maps that enter the transformer. Every loss is called with lists over levels j:
    student_features [B, d_S, H_j, W_j], teacher_features [B, d_T, H_j, W_j] (detached here as well),
    masks [B, H_j, W_j] (True = padding),
plus the ground-truth targets (list over images of {'boxes': [M, 4] normalized cxcywh of the unpadded image,
'size': int64 [2] (h, w) of the unpadded image}) and padded_size (H_pad, W_pad), the padded batch size in
pixels. It returns the weighted loss summed over levels (a scalar).

Padding: the original codes ran on mmdet batches, where padded positions count as background. Here padded
positions take part in nothing (no loss term, no attention, no context pooling), so a loss does not depend on
how much the batch it lands in happens to be padded.

`weight=None` takes the default of each paper's detection configs (stored as `.weight`):
    fitnet 1.0, fgd 1e-3 (alpha; beta, gamma, lambda keep their config ratios to it), mgd 2e-5.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.box_ops import cxcywh_to_xyxy


def _f32(x: Tensor) -> Tensor:
    """Reductions run in float32 even under bf16 autocast; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_levels(module: nn.Module, *lists) -> None:
    if any(len(x) != module.num_levels for x in lists):
        raise ValueError(f"{type(module).__name__} expects {module.num_levels} levels, got "
                         f"{[len(x) for x in lists]}")


def _align(student_dim: int, teacher_dim: int, num_levels: int) -> nn.ModuleList:
    """FGD's / MGD's student -> teacher adapter: a 1x1 conv per level when widths differ, identity otherwise."""
    make = (lambda: nn.Conv2d(student_dim, teacher_dim, 1)) if student_dim != teacher_dim else nn.Identity
    return nn.ModuleList([make() for _ in range(num_levels)])


# ----------------------------------------------------------------------------------------------------- FitNet

class FitNetLoss(nn.Module):
    """FitNet hints (Romero et al., ICLR 2015) on detection features.

    A learnable 1x1 conv phi_j per level (always present) maps the student to the teacher's width, and
        L = weight * sum_j mean_{valid (b, h, w), c} (phi_j(S_j) - T_j)^2.
    """
    # Default weight 1.0: the FitNet detection baseline of HEAD (Wang et al., ECCV 2022; LutingWang/HEAD
    # configs/kd/fitnet.py) uses exactly this form, a 1x1 conv adapter per FPN level and mean MSE, weight 1.0.
    default_weight = 1.0

    def __init__(self, student_dim: int, teacher_dim: int, num_levels: int, weight: float = None):
        super().__init__()
        self.num_levels = num_levels
        self.weight = self.default_weight if weight is None else float(weight)
        self.adapters = nn.ModuleList([nn.Conv2d(student_dim, teacher_dim, 1) for _ in range(num_levels)])

    def forward(self, student_features: list, teacher_features: list, masks: list, targets: list = None,
                padded_size: tuple = None) -> Tensor:
        _check_levels(self, student_features, teacher_features, masks)
        loss = 0.0
        for adapter, s, t, pad in zip(self.adapters, student_features, teacher_features, masks):
            s, t = _f32(adapter(s)), _f32(t.detach())
            valid = (~pad).unsqueeze(1).to(s.dtype)                                  # [B, 1, H, W]
            count = (valid.sum() * t.shape[1]).clamp(min=1)
            loss = loss + ((s - t).pow(2) * valid).sum() / count
        return self.weight * loss


# -------------------------------------------------------------------------------------------------------- FGD

def boxes_to_cells(boxes: Tensor, image_size: Tensor, grid_size: tuple, padded_size: tuple) -> Tensor:
    """The feature-grid cells a box covers.

    boxes [M, 4] normalized cxcywh relative to the unpadded image, image_size (h, w) of the unpadded image in
    pixels, grid_size (H, W) of the feature map, padded_size (H_pad, W_pad) of the padded batch in pixels
    -> [M, 4] int64 (x0, y0, x1, y1): the box covers columns x0 <= x < x1 and rows y0 <= y < y1, i.e. every
    cell it overlaps (FGD's floor / ceil), and at least one cell.
    """
    H, W = grid_size
    h, w = image_size.to(boxes)
    # normalized -> pixels of the unpadded image -> cells; the grid spans the *padded* image (the same
    # convention as DETR's padding mask, which is the pixel mask resized to H x W)
    scale = torch.stack([w * W / padded_size[1], h * H / padded_size[0]]).repeat(2)
    x0, y0, x1, y1 = (cxcywh_to_xyxy(boxes) * scale).unbind(-1)
    eps = 1e-4  # an edge lying on a cell border must not spill into the neighbouring cell by rounding
    x0 = torch.floor(x0 + eps).clamp(0, W - 1)
    y0 = torch.floor(y0 + eps).clamp(0, H - 1)
    x1 = torch.maximum(torch.ceil(x1 - eps).clamp(max=W), x0 + 1)
    y1 = torch.maximum(torch.ceil(y1 - eps).clamp(max=H), y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=-1).long()


def foreground_background_masks(targets: list, padding: Tensor, padded_size: tuple, dtype=torch.float32):
    """FGD's binary masks with their scale masks folded in.

    padding [B, H, W] (True = padding) -> fg [B, H, W], bg [B, H, W]:
    fg = 1 / (cells of the box) inside a ground-truth box (the smallest box wins where boxes overlap), so each
    object counts about equally whatever its size; bg = 1 / (number of background cells) elsewhere. Padded
    cells are in neither.
    """
    B, H, W = padding.shape
    device = padding.device
    fg = torch.zeros(B, H, W, dtype=dtype, device=device)
    rows, cols = torch.arange(H, device=device), torch.arange(W, device=device)
    for b, t in enumerate(targets):
        if t["boxes"].numel() == 0:
            continue
        x0, y0, x1, y1 = boxes_to_cells(t["boxes"].to(dtype), t["size"], (H, W), padded_size).unbind(-1)
        in_x = (cols >= x0[:, None]) & (cols < x1[:, None])                         # [M, W]
        in_y = (rows >= y0[:, None]) & (rows < y1[:, None])                         # [M, H]
        inside = (in_y[:, :, None] & in_x[:, None, :]).to(dtype)                     # [M, H, W]
        area = ((x1 - x0) * (y1 - y0)).to(dtype)
        fg[b] = (inside / area[:, None, None]).amax(dim=0)
    valid = ~padding
    fg = fg * valid
    bg = ((fg == 0) & valid).to(dtype)
    bg = bg / bg.flatten(1).sum(1).clamp(min=1)[:, None, None]
    return fg, bg


def fgd_attention(feature: Tensor, valid: Tensor, temperature: float):
    """FGD's attention masks over the valid positions.

    feature [B, C, H, W], valid [B, H, W] bool -> spatial [B, H, W], channel [B, C]:
        spatial = n_valid * softmax_{h,w}(mean_c |F| / T)   (mean 1 over valid positions, 0 on padding)
        channel = C * softmax_c(mean_{valid h,w} |F| / T)   (mean 1)
    """
    B, C, H, W = feature.shape
    a = feature.abs()
    n = valid.flatten(1).sum(1).to(a.dtype)                                         # [B]
    g_spatial = (a.mean(dim=1) / temperature).masked_fill(~valid, torch.finfo(a.dtype).min)
    spatial = n[:, None] * F.softmax(g_spatial.flatten(1), dim=1)
    spatial = spatial.view(B, H, W) * valid
    g_channel = (a * valid[:, None]).sum(dim=(2, 3)) / n.clamp(min=1)[:, None]
    channel = C * F.softmax(g_channel / temperature, dim=1)
    return spatial, channel


class GlobalContext(nn.Module):
    """GcBlock (Cao et al., GCNet 2019), FGD's relation module for its global loss.

    R(F) = F + W2 ReLU(LN(W1 sum_p softmax_p(Wk F)_p F_p)): one attention-pooled context vector per image,
    transformed and added back at every position. [B, C, H, W], valid [B, H, W] -> [B, C, H, W].
    """

    def __init__(self, dim: int):
        super().__init__()
        self.key = nn.Conv2d(dim, 1, 1)
        self.transform = nn.Sequential(nn.Conv2d(dim, dim // 2, 1), nn.LayerNorm([dim // 2, 1, 1]), nn.ReLU(),
                                       nn.Conv2d(dim // 2, dim, 1))
        nn.init.kaiming_normal_(self.key.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.key.bias)
        # zero last layer: the block starts as the identity (GCNet's and FGD's initialisation)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        logits = self.key(x).flatten(1)                                              # [B, HW]
        logits = logits.masked_fill(~valid.flatten(1), torch.finfo(logits.dtype).min)
        weights = F.softmax(logits, dim=1).to(x.dtype)
        context = torch.einsum("bp,bcp->bc", weights, x.flatten(2))[:, :, None, None]  # [B, C, 1, 1]
        return x + self.transform(context)


class FGDLoss(nn.Module):
    """Focal and Global Distillation (Yang et al., CVPR 2022), per level (student aligned by a 1x1 conv when the
    widths differ; A_S, A_C are the spatial and channel attention of `fgd_attention`):

        focal     alpha * sum fg * A_S^T * A_C^T * (T - S)^2 / B  +  beta * (same with bg) / B
        attention gamma * (sum |A_S^T - A_S^S| + sum |A_C^T - A_C^S|) / B
        global    lambda * sum (R_T(T) - R_S(S))^2 / B          (R: a GcBlock each for teacher and student)

    sums over channels and valid positions, summed over levels.
    """
    # DETRDistill's own FGD baseline for Deformable DETR (BIVLab-USTC/DETRDistill,
    # project/cfg_distill/fgd_deformdetr_r50_distill_r50_coco_imagenetpretrain.py) uses temp 0.5, alpha 1e-3,
    # beta 5e-4, gamma 5e-4, lambda 5e-6 on the 4 channel-mapper levels: the same values as FGD's RetinaNet
    # config (yzd-v/FGD configs/distillers/fgd/fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py).
    # `weight` is alpha; beta, gamma and lambda keep those ratios to it, so `weight` scales all four terms.
    default_weight = 1e-3
    ratios = dict(beta=0.5, gamma=0.5, lam=0.005)

    def __init__(self, student_dim: int, teacher_dim: int, num_levels: int, weight: float = None,
                 temperature: float = 0.5):
        super().__init__()
        self.num_levels = num_levels
        self.weight = self.default_weight if weight is None else float(weight)
        self.alpha = self.weight
        self.beta = self.weight * self.ratios["beta"]
        self.gamma = self.weight * self.ratios["gamma"]
        self.lam = self.weight * self.ratios["lam"]
        self.temperature = temperature
        self.align = _align(student_dim, teacher_dim, num_levels)
        self.context_student = nn.ModuleList([GlobalContext(teacher_dim) for _ in range(num_levels)])
        self.context_teacher = nn.ModuleList([GlobalContext(teacher_dim) for _ in range(num_levels)])

    def forward(self, student_features: list, teacher_features: list, masks: list, targets: list,
                padded_size: tuple) -> Tensor:
        _check_levels(self, student_features, teacher_features, masks)
        loss = 0.0
        for j, (s, t, pad) in enumerate(zip(student_features, teacher_features, masks)):
            s, t = _f32(self.align[j](s)), _f32(t.detach())
            B = s.shape[0]
            valid = ~pad
            spatial_t, channel_t = fgd_attention(t, valid, self.temperature)
            spatial_s, channel_s = fgd_attention(s, valid, self.temperature)
            fg, bg = foreground_background_masks(targets, pad, padded_size, s.dtype)

            # focal: the teacher's attention decides where and which channels to imitate
            sq = (s - t).pow(2) * spatial_t[:, None] * channel_t[:, :, None, None]
            fg_loss = (sq * fg[:, None]).sum() / B
            bg_loss = (sq * bg[:, None]).sum() / B
            # attention: the student also learns where the teacher looks
            att_loss = ((spatial_s - spatial_t).abs().sum() + (channel_s - channel_t).abs().sum()) / B
            # global: relations between positions, through each side's context block
            rel_s = _f32(self.context_student[j](s, valid))
            rel_t = _f32(self.context_teacher[j](t, valid))
            global_loss = ((rel_s - rel_t).pow(2) * valid[:, None]).sum() / B

            loss = loss + (self.alpha * fg_loss + self.beta * bg_loss + self.gamma * att_loss
                           + self.lam * global_loss)
        return loss


# -------------------------------------------------------------------------------------------------------- MGD

class MGDLoss(nn.Module):
    """Masked Generative Distillation (Yang et al., ECCV 2022), per level:

        M ~ Bernoulli(1 - mask_ratio) per position, shared by the channels,
        L = weight * sum_{c, valid h,w} (G(S * M) - T)^2 / B,   G = conv3x3 -> ReLU -> conv3x3,

    S the student map aligned by a 1x1 conv when the widths differ; summed over levels. The student must
    *generate* the teacher's full map from a random part of its own. Padded positions are zeroed in G's
    input (as if masked) and left out of the sum.

    Randomness: one `torch.rand(B, 1, H_j, W_j)` (float32, on the features' device) per level in level order
    from torch's global RNG; a position is kept where the draw is <= 1 - mask_ratio.
    """
    # alpha 2e-5, lambda 0.65: MGD's configs for RetinaNet / RepPoints (yzd-v/MGD
    # det/configs/distillers/mgd/retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py), the one-stage setting
    # that DETRDistill's FGD baseline also follows (its Faster R-CNN config uses 5e-7 and 0.45 instead).
    default_weight = 2e-5

    def __init__(self, student_dim: int, teacher_dim: int, num_levels: int, weight: float = None,
                 mask_ratio: float = 0.65):
        super().__init__()
        self.num_levels = num_levels
        self.weight = self.default_weight if weight is None else float(weight)
        self.mask_ratio = mask_ratio
        self.align = _align(student_dim, teacher_dim, num_levels)
        self.generation = nn.ModuleList([
            nn.Sequential(nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(teacher_dim, teacher_dim, 3, padding=1))
            for _ in range(num_levels)])

    def forward(self, student_features: list, teacher_features: list, masks: list, targets: list = None,
                padded_size: tuple = None) -> Tensor:
        _check_levels(self, student_features, teacher_features, masks)
        loss = 0.0
        for j, (s, t, pad) in enumerate(zip(student_features, teacher_features, masks)):
            s, t = self.align[j](s), _f32(t.detach())
            B, _, H, W = t.shape
            keep = torch.rand(B, 1, H, W, dtype=torch.float32, device=s.device) <= 1 - self.mask_ratio
            valid = (~pad).unsqueeze(1)
            generated = _f32(self.generation[j](s * (keep & valid).to(s.dtype)))
            loss = loss + ((generated - t).pow(2) * valid).sum() / B
        return self.weight * loss


# ------------------------------------------------------------------------------------------------------ build

BASELINES = {"fitnet": FitNetLoss, "fgd": FGDLoss, "mgd": MGDLoss}


def build_baseline(method: str, student_dim: int, teacher_dim: int, num_levels: int,
                   weight: float = None) -> nn.Module:
    """The baseline loss module for `method` in {fitnet, fgd, mgd}; weight None = its paper's default."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; expected one of {sorted(BASELINES)}")
    return BASELINES[method](student_dim, teacher_dim, num_levels, weight)
