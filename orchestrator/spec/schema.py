"""The spec's schema: the pydantic models of an experiment, which embed the trial models of trainers/config.py."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, Field, model_validator

from trainers.config import (LABEL_MAP, DataConfig, DistillConfig, LossConfig, ModelConfig, RuntimeConfig,
                             ScheduleConfig, StrictModel)

Metric = Literal["AP", "AP50", "AP75", "APs", "APm", "APl"]
# Names end up in MLflow experiment/run names and file names under results/.
SafeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]

TRIAL_SECTIONS = ("data", "teacher", "student", "loss", "distill")  # what ablate and variants may change


class TeacherSpec(StrictModel):
    """The teacher. Trained by the experiment from `model` and `schedule`, unless `checkpoint` gives its
    weights: a checkpoint file, a transformers save_pretrained directory, an MLflow URI
    runs:/<run_id>/<artifact path>, or a transformers checkpoint on the Hugging Face hub, hf:<repo id>[@revision]
    (from the hub cache, or downloaded into it unless offline)."""
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(backbone="resnet101"))
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    checkpoint: Optional[str] = None
    label_map: dict[str, str] = Field(default_factory=dict, description=LABEL_MAP)


class StudentSpec(StrictModel):
    model: ModelConfig = Field(default_factory=ModelConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)


class TableSpec(StrictModel):
    """The paper-style table: one row per combination of `rows` values, one column group per `columns`
    value, the `metrics` in each (seeds averaged). `baseline` names a reference cell, e.g.
    {distill.method: none}; the table shows the other cells' gain over it."""
    rows: list[str] = Field(default_factory=list)
    columns: Optional[str] = None
    metrics: list[Metric] = Field(default_factory=lambda: ["AP", "AP50", "AP75"], min_length=1)
    baseline: Optional[dict[str, Any]] = None
    predictions: int = Field(0, ge=0, description=(
        "Draw this many validation images with every finished model's detections side by side (teachers "
        "first) into results/<experiment>/predictions/, also artifacts of the parent run."))


class ResourcesSpec(StrictModel):
    gpus_per_trial: Optional[float] = Field(None, ge=0)  # fractions share a GPU; None = 1 if there are GPUs, else 0
    # None = a GPU trial's share of its node's CPUs (CPUs per GPU x gpus_per_trial), a CPU trial 1; also the trial's
    # torch threads, which the KD assignment solve and the host side of a GPU step use
    cpus_per_trial: Optional[int] = Field(None, ge=1)
    max_concurrent: Optional[int] = Field(None, ge=1)  # None = as many as the resources allow
    max_retries: int = Field(1, ge=0)  # re-runs of a failed trial (resuming from its last checkpoint)


class TrackingSpec(StrictModel):
    experiment: Optional[str] = None  # MLflow experiment name; None = the spec's name
    tracking_uri: Optional[str] = None  # None = the command line's --tracking-uri, else sqlite:///mlflow.db


# What a search optimises: an evaluation metric (every epoch needs evaluating: eval_every 1) or a training loss
# term, which the engine reports every epoch. train/loss includes the weighted distillation terms, so it is
# no fair judge of distillation weights; the detection terms are.
SearchMetric = Literal["AP", "AP50", "AP75", "APs", "APm", "APl",
                       "train/loss", "train/loss_cls", "train/loss_l1", "train/loss_giou"]
SEARCH_SECTIONS = ("student", "distill")  # what a search may vary: the teacher is trained once for all trials
ChoiceValue = Union[None, bool, int, float, str]  # what Optuna stores as a categorical choice


class SearchParam(StrictModel):
    """One searched setting: `uniform` or `loguniform` floats in [low, high], `int` integers from low to high
    (both included), or a `choice` among `values` (plain scalars)."""
    type: Literal["uniform", "loguniform", "int", "choice"]
    low: Optional[Union[int, float]] = None
    high: Optional[Union[int, float]] = None
    values: Optional[list[ChoiceValue]] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "SearchParam":
        if self.type == "choice":
            if self.values is None:
                raise ValueError("a choice needs values: [...]")
            if self.low is not None or self.high is not None:
                raise ValueError("a choice takes values, not low and high")
            if len({json.dumps(v) for v in self.values}) != len(self.values):
                raise ValueError("values of a choice must be distinct")
            return self
        if self.values is not None:
            raise ValueError(f"{self.type} takes low and high, not values (values are for a choice)")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both low and high")
        if self.type == "int" and not all(isinstance(v, int) for v in (self.low, self.high)):
            raise ValueError(f"int needs whole numbers for low and high, got {self.low} and {self.high}")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (it samples the logarithm), got low {self.low}")
        return self

    def ends(self) -> list[tuple[tuple, Any]]:
        """(where in the param, value) of every value that bounds what can be sampled: both ends, or each choice."""
        if self.type == "choice":
            return [(("values", i), v) for i, v in enumerate(self.values)]
        cast = int if self.type == "int" else float
        return [(("low",), cast(self.low)), (("high",), cast(self.high))]


class SamplerSpec(StrictModel):
    """Optuna's sampler: TPE (after `startup_trials` random ones; None = Optuna's default, 10) or random."""
    type: Literal["tpe", "random"] = "tpe"
    seed: int = Field(0, ge=0, lt=2**32)
    startup_trials: Optional[int] = Field(None, ge=1)


class AshaSpec(StrictModel):
    """Asynchronous successive halving on the per-epoch metric: at epochs grace_period x reduction_factor^k a
    trial that is not among the best 1/reduction_factor of those that reached that epoch is stopped."""
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: Optional[int] = Field(None, ge=1)  # None = the student's epochs

    @model_validator(mode="after")
    def _check(self) -> "AshaSpec":
        if self.max_t is not None and self.grace_period >= self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) must be below max_t ({self.max_t}), or ASHA can "
                             f"never stop a trial early")
        return self


class SearchSpec(StrictModel):
    """A hyperparameter search: Ray Tune trials with Optuna's sampler over `space` (dotted student.* and
    distill.* keys), one search per ablate/variant cell."""
    space: dict[str, SearchParam] = Field(min_length=1)
    metric: SearchMetric = "AP"
    mode: Optional[Literal["max", "min"]] = None  # None: max for AP metrics, min for losses
    num_samples: int = Field(8, ge=1)  # trials per search (per cell)
    max_concurrent: Optional[int] = Field(None, ge=1)  # None = resources.max_concurrent, else what fits the cluster
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    scheduler: Optional[AshaSpec] = None  # None: every trial runs all its epochs

    @model_validator(mode="after")
    def _check(self) -> "SearchSpec":
        natural = "min" if self.metric.startswith("train/") else "max"
        if self.mode is not None and self.mode != natural:
            what = "a training loss" if natural == "min" else "an accuracy"
            raise ValueError(f"mode {self.mode} would {'maximise' if natural == 'min' else 'minimise'} {what} "
                             f"({self.metric}); use mode {natural} or leave mode out")
        return self

    @property
    def direction(self) -> Literal["max", "min"]:
        return self.mode or ("min" if self.metric.startswith("train/") else "max")


class Spec(StrictModel):
    """A whole experiment. Build it with `load_spec`/`parse_spec`/`validate_spec`: `Spec.model_validate`
    alone checks the structure, not the cross-field and per-trial rules."""
    name: SafeName
    description: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: Optional[TeacherSpec] = None  # required when any trial distils
    student: StudentSpec
    loss: LossConfig = Field(default_factory=LossConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    # dotted key -> values; the cartesian product of all lists is the grid, each cell one trial group
    ablate: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    # name -> {dotted key: value}: named groups of settings changed together, each combined with the grid
    variants: dict[SafeName, dict[str, Any]] = Field(default_factory=dict)
    seeds: list[Annotated[int, Field(ge=0, lt=2**32)]] = Field(default_factory=lambda: [0], min_length=1)
    table: Optional[TableSpec] = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)  # every trial's, teacher and students
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    search: Optional[SearchSpec] = None  # a hyperparameter search instead of one trial per cell (search.py)


SECTION_MODELS: dict[str, type[BaseModel]] = {
    "data": DataConfig, "teacher": TeacherSpec, "student": StudentSpec, "loss": LossConfig,
    "distill": DistillConfig, "runtime": RuntimeConfig}
