"""Pydantic models of one trial: the single source of truth for what a trainer builds and runs.

The orchestrator's spec embeds these models (teacher/student model and schedule, data, distillation) and
adds the experiment-level parts (ablation grid, table, resources). A trainer receives a validated
`TrialConfig` and nothing else. Derived values (e.g. a family's default FFN width) are computed by
properties, never stored twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Family = Literal["conditional_detr", "deformable_detr", "adamixer"]
BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2"]

# Family defaults that differ between the original papers' configs.
FAMILY_DEFAULTS = {
    "conditional_detr": dict(ffn_dim=2048, num_feature_levels=1),
    "deformable_detr": dict(ffn_dim=1024, num_feature_levels=4),
    "adamixer": dict(ffn_dim=2048, num_feature_levels=4),
}


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a spec must never be silently ignored."""
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class ModelConfig(StrictModel):
    family: Family = "conditional_detr"
    backbone: BackboneName = "resnet50"
    backbone_weights: Union[Literal["imagenet"], Path, None] = Field(None, description=(
        "imagenet: torchvision's IMAGENET1K_V1 weights of the backbone (what DETR and MMDetection start from), "
        "from torch hub's cache or downloaded into it; or a local torchvision state_dict file; null: random "
        "initialisation."))
    train_backbone: bool = True
    # "auto": frozen batch norm (DETR's recipe) for pretrained weights, trainable batch norm from scratch
    backbone_norm: Literal["auto", "frozen_bn", "batch_norm"] = "auto"
    # DC5 (Conditional DETR's -DC5 models): C5 at stride 16, twice the side of the map the transformer sees
    backbone_dilation: bool = False
    encoder_layers: int = Field(6, ge=0)
    decoder_layers: int = Field(6, ge=1)
    num_queries: int = Field(300, ge=1)
    hidden_dim: int = Field(256, ge=8)
    num_heads: int = Field(8, ge=1)
    ffn_dim: Optional[int] = Field(None, ge=8)  # None = the family's default
    num_feature_levels: Optional[int] = Field(None, ge=1, le=5)  # None = the family's default
    num_points: int = Field(4, ge=1)  # deformable attention sampling points per head and level
    # stride of the finest feature level: 8 (C3-C5 then extra stride-2 convs, Deformable DETR's pyramid) or
    # 4 (C2-C5 then extra convs, AdaMixer's official pyramid); None = 8
    finest_stride: Optional[Literal[4, 8]] = None
    # AdaMixer's mixers: G channel groups, P_in sampled points and P_out mixed-out points per group (official
    # 4 / 32 / 128); the generator of a query's mixing weights has d x G (d^2/G^2 + P_in P_out) parameters
    mixing_groups: int = Field(4, ge=1)
    mixing_in_points: int = Field(32, ge=1)
    mixing_out_points: int = Field(128, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # conditional_detr: "xavier" is the paper's initialisation; "local" (for training from scratch on little
    # data) starts each decoder cross-attention head as a kernel around its query's reference point and the
    # encoder as the identity (ConditionalDETR._local_attention_init; docs/small_config.md)
    attention_init: Literal["xavier", "local"] = "xavier"

    @model_validator(mode="before")
    @classmethod
    def _no_encoder_for_adamixer(cls, data: Any) -> Any:
        """adamixer's encoder_layers is 0, what it has, so a dumped config validates again (workers,
        checkpoints); any other value is refused."""
        if isinstance(data, dict) and data.get("family") == "adamixer":
            if data.get("encoder_layers"):
                raise ValueError("adamixer has no transformer encoder; leave encoder_layers unset")
            data = {**data, "encoder_layers": 0}
        return data

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.hidden_dim % 4:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by 4 (sine position encodings)")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if self.hidden_dim % 32 and (self.family == "deformable_detr" or
                                     (self.family == "conditional_detr" and self.levels > 1)):
            raise ValueError(f"{self.family} with {self.levels} feature level(s) needs hidden_dim divisible by 32 "
                             f"(GroupNorm(32) input projections), got {self.hidden_dim}")
        if self.family == "adamixer" and self.hidden_dim % 8:
            raise ValueError("adamixer needs hidden_dim divisible by 8 (its (x, y, z, r) position encoding)")
        if self.family == "adamixer" and self.hidden_dim % self.mixing_groups:
            raise ValueError(f"adamixer needs hidden_dim {self.hidden_dim} divisible by its {self.mixing_groups} "
                             "mixing groups")
        if self.attention_init == "local" and self.family != "conditional_detr":
            raise ValueError(f"attention_init 'local' is for conditional_detr; {self.family} keeps 'xavier'")
        if self.attention_init == "local" and (self.hidden_dim // self.num_heads) % 4:
            raise ValueError(f"attention_init 'local' needs a head width (hidden_dim / num_heads = "
                             f"{self.hidden_dim // self.num_heads}) divisible by 4: per head a sin and a cos "
                             "of y and of x")
        if self.finest_stride == 4 and (self.family != "adamixer" or self.levels < 4):
            raise ValueError("finest_stride 4 (a C2-C5 pyramid) is for adamixer with num_feature_levels >= 4; "
                             f"got {self.family} with {self.levels} level(s)")
        if self.backbone_dilation and (self.family != "conditional_detr" or not self.backbone.startswith("resnet")):
            raise ValueError("backbone_dilation (DC5) is for conditional_detr on a resnet: the multi-scale "
                             "families assume strides 8/16/32")
        if self.backbone_dilation and self.levels != 1:  # conditional_detr here
            raise ValueError("backbone_dilation (DC5) is a single-level conditional_detr; with it "
                             "num_feature_levels must be 1")
        return self

    @property
    def norm(self) -> str:
        if self.backbone_norm != "auto":
            return self.backbone_norm
        return "frozen_bn" if self.backbone_weights is not None else "batch_norm"

    @property
    def ffn(self) -> int:
        return self.ffn_dim or FAMILY_DEFAULTS[self.family]["ffn_dim"]

    @property
    def levels(self) -> int:
        return self.num_feature_levels or FAMILY_DEFAULTS[self.family]["num_feature_levels"]


class AugmentConfig(StrictModel):
    """DETR's augmentation: multi-scale resize (shorter side from `scales`, longer side <= max_size), a
    random-crop branch taken with probability 0.5, horizontal flip; evaluation resizes to `test_size`."""
    scales: list[int] = Field(default_factory=lambda: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800])
    max_size: int = 1333
    crop: bool = True
    crop_resize: list[int] = Field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    flip: float = Field(0.5, ge=0.0, le=1.0)
    test_size: int = Field(800, ge=16)

    @model_validator(mode="after")
    def _check(self) -> "AugmentConfig":
        if not self.scales or min(self.scales) < 16:
            raise ValueError("scales must be a non-empty list of shorter-side sizes >= 16")
        if self.crop and (not self.crop_resize or self.crop_min > self.crop_max):
            raise ValueError(f"crop needs crop_resize sizes and crop_min <= crop_max "
                             f"(got {self.crop_min} > {self.crop_max})")
        return self


class DataConfig(StrictModel):
    """COCO-format data on disk, or the synthetic task (generated once into `root` and reused)."""
    format: Literal["coco", "synthetic"] = "synthetic"
    root: Path = Path("data/synthetic")
    train: str = "annotations/instances_train.json"
    val: str = "annotations/instances_val.json"
    train_images: str = Field("train", description=(
        "the training images' folder, relative to root; the synthetic task's size is synthetic_train"))
    val_images: str = Field("val", description=(
        "the validation images' folder, relative to root; the synthetic task's size is synthetic_val"))
    # synthetic generator settings (ignored for coco)
    synthetic_train: int = Field(2000, ge=1)
    synthetic_val: int = Field(300, ge=1)
    synthetic_seed: int = 0
    synthetic_image_size: int = Field(256, ge=32)
    synthetic_max_objects: int = Field(8, ge=1)  # 1..N objects per image: fewer makes an easier task
    synthetic_min_size: float = Field(0.08, gt=0, lt=0.65)  # smallest object / shorter side: larger is easier
    synthetic_classes: int = Field(10, ge=1, le=10)  # the first N shape classes: fewer makes an easier task
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    pad_size_divisor: int = Field(1, ge=1, description=(
        "Pad each batch's height and width up to a multiple of this (MMDetection's pad_size_divisor, "
        "Detectron2's SIZE_DIVISIBILITY); 1 pads to the batch's largest image, as DETR does. A coarser divisor "
        "puts DETR's multi-scale batches in fewer shapes, for more padded pixels (how many: "
        "benchmarks/batch_shapes.py); CUDA graphs (runtime.cuda_graph, teacher_cuda_graph) need few."))
    limit_train: Optional[int] = Field(None, ge=1)  # use only the first N training images (debug, overfit)
    limit_val: Optional[int] = Field(None, ge=1)


class LossConfig(StrictModel):
    """DETR set loss: focal classification, L1 and GIoU box terms, matched with the same-weighted costs."""
    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    match_cls: float = 2.0
    match_l1: float = 5.0
    match_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


class ScheduleConfig(StrictModel):
    """Optimisation: AdamW, lr x `lr_backbone_mult` for the backbone and x `lr_linear_proj_mult` for
    deformable sampling offsets / reference points, linear warm-up, step decay at `lr_drop_epochs`."""
    epochs: int = Field(50, ge=1)
    lr: float = Field(2e-4, gt=0)
    lr_backbone_mult: float = Field(0.1, ge=0)
    lr_linear_proj_mult: float = Field(0.1, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(2, ge=1)
    grad_clip: float = Field(0.1, ge=0)  # 0 = no clipping
    warmup_iters: int = Field(0, ge=0, description=(
        "Linear warm-up: the lr factor rises from warmup_ratio at the first iteration to 1 at this one "
        "(MMDetection's linear warm-up; the official DETRDistill run: 500 iterations from 0.001). 0: none."))
    warmup_ratio: float = Field(0.001, gt=0, le=1, description="The lr factor at the first warm-up iteration.")
    lr_drop_epochs: list[int] = Field(default_factory=lambda: [40])
    lr_drop_factor: float = Field(0.1, gt=0)
    amp: bool = True  # bf16 autocast when on CUDA; ignored on the CPU
    amp_layer_norm: Literal["float32", "bfloat16"] = Field("float32", description=(
        "The dtype of LayerNorm outputs under amp. float32 is autocast's policy; bfloat16 (statistics and affine "
        "still computed in float32) keeps the transformer's residual stream in bf16, as Megatron-LM does, so "
        "that no LayerNorm output is cast again before the next bf16 matrix product: fewer operators for a GPU "
        "step bound by its launches, one more rounding of each residual sum (models/transformer_layers.py: "
        "layer_norm). Student and teacher alike."))
    eval_every: int = Field(1, ge=1)  # evaluate every N epochs (and always after the last)


LayerMappingName = Literal["layerwise", "last", "first", "uniform", "final"]


class LogitsKDConfig(StrictModel):
    """Hungarian-matching logits distillation (docs/method.md)."""
    weight: float = Field(1.0, ge=0)
    split: Literal["all", "positive_negative"] = "all"  # "all" = official code; the other = paper's reading
    threshold: float = Field(0.5, gt=0, lt=1)  # positive/negative split on max teacher probability
    cost_cls: float = 1.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0


class FeatureKDConfig(StrictModel):
    """Target-aware feature distillation (docs/method.md)."""
    weight: float = Field(1.0, ge=0)
    top_k: int = Field(100, ge=1)
    quality: bool = True  # False = the paper's plain-mask ablation (no prob x IoU weighting)


class QueryPriorKDConfig(StrictModel):
    """Query-prior assignment distillation (docs/method.md)."""
    weight: float = Field(1.0, ge=0)
    assignment: Literal["self", "teacher"] = Field("self", description=(
        "How the teacher's query group in the student's decoder finds its targets. self: its own Hungarian "
        "matching to the ground truth, Group-DETR style (what the official code runs); teacher: the teacher's "
        "assignment of those queries to the ground truth, layer by layer through the mapping (the paper's "
        "text)."))


class ContrastiveKDConfig(StrictModel):
    """Query contrastive distillation, the official run's fourth term (docs/method.md)."""
    weight: float = Field(0.2, ge=0, description="0.2 in the official run; 0 turns the term off.")
    dim: int = Field(512, ge=2, description="Width of the projection heads' shared embedding.")
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature.")


class BaselineKDConfig(StrictModel):
    """Feature-level baselines designed for CNN detectors (FitNet, FGD, MGD); weights default to their
    papers' detection configs, filled in by trainers.distill.baselines."""
    weight: Optional[float] = Field(None, ge=0)


class DistillConfig(StrictModel):
    method: Literal["none", "detrdistill", "fitnet", "fgd", "mgd"] = "none"
    logits: LogitsKDConfig = Field(default_factory=LogitsKDConfig)
    feature: FeatureKDConfig = Field(default_factory=FeatureKDConfig)
    query_prior: QueryPriorKDConfig = Field(default_factory=QueryPriorKDConfig)
    contrastive: ContrastiveKDConfig = Field(default_factory=ContrastiveKDConfig)
    baseline: BaselineKDConfig = Field(default_factory=BaselineKDConfig)
    # which teacher decoder layer teaches each student layer: a strategy, or an explicit list (one teacher
    # layer index per student layer, 0-based)
    layer_mapping: Union[LayerMappingName, list[int]] = "last"


LABEL_MAP = ("A pretrained transformers teacher's classes are matched to the dataset's categories by name; "
             "this maps a dataset category name to the teacher's name for it where the two differ.")


class TeacherConfig(StrictModel):
    """The frozen teacher of a distillation trial: its architecture and where its weights are (our
    checkpoint file, or a transformers save_pretrained directory)."""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(backbone="resnet101"))
    checkpoint: Optional[Path] = None
    label_map: dict[str, str] = Field(default_factory=dict, description=LABEL_MAP)


class RuntimeConfig(StrictModel):
    """How a trial runs, not what it learns: the device, threads, data workers and speed switches. The whole
    section is left out of a trial's identity, so changing it never trains a finished trial again. Where a
    switch changes random draws or rounding, its description says so."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(None, ge=1, description=(
        "torch threads (the KD assignment solve runs on them too); None leaves torch's default. The "
        "orchestrator sets it from resources.cpus_per_trial. Reductions may round differently with another count."))
    data_workers: int = Field(2, ge=0, description=(
        "DataLoader worker processes. Augmentation draws its random numbers in the workers when there are any, "
        "in the training process when 0: the two give different (equally valid) random draws."))
    overlap_teacher: Literal["auto", "on", "thread", "off"] = Field("auto", description=(
        "Distillation: queue the teacher's forward on the next batch while the CPU solves this step's "
        "teacher-student matching, which a GPU would otherwise idle through. auto: on CUDA with data workers, "
        "where it changes no value; on: anywhere (with data_workers 0 the next batch's augmentation then draws "
        "its random numbers before this step's dropout, so a run differs from one without it); thread: as on, "
        "the teacher's forward issued by a helper thread on a CUDA stream of its own; off: never."))
    compile: bool = Field(False, description=(
        "torch.compile the student's training forward (and a distillation teacher's): fewer launches for GPU "
        "steps that wait on their host. The first step of a new input shape compiles (minutes), later shapes "
        "compile as dynamic. Fused kernels round differently from eager ones; with amp the compiled student "
        "runs on autocast alone."))
    cuda_graph: bool = Field(False, description=(
        "On CUDA, replay the student's training forward and backward from CUDA graphs captured per input shape "
        "(the second time a shape comes; at most 2 kept). Pays off when batch shapes repeat (fixed-size images, "
        "a coarse data.pad_size_divisor); it stops capturing when they vary too much. Same values as eager, "
        "but dropout draws other random numbers. Not with compile."))
    teacher_cuda_graph: bool = Field(False, description=(
        "On CUDA, replay a distillation teacher's forward from a CUDA graph captured per input shape (the "
        "second time a shape comes; at most 8 kept). Same values as the eager forward. Ignored with compile."))

    @model_validator(mode="after")
    def _check(self) -> "RuntimeConfig":
        if self.compile and self.cuda_graph:
            raise ValueError("compile and cuda_graph both replace the eager training forward: choose one")
        return self


class TrialConfig(StrictModel):
    """Everything one trial needs. Its content hash identifies it (see `trial_hash`)."""
    name: str = "trial"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    seed: int = 0
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    init_checkpoint: Optional[Path] = None  # start the model from these weights (not a resume)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    teacher: Optional[TeacherConfig] = None  # required when distill.method != "none"
