"""A validated spec as trials: variants x ablate grid x seeds, each a TrialConfig named by its hash; and, for a
spec with a search block, its searches (one per grid cell) and the spec of each sampled point."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from orchestrator.spec.load import validate_spec
from orchestrator.spec.raw import grid_cells, set_path, value_label
from orchestrator.spec.schema import Spec
from trainers import version
from trainers.config import DistillConfig, TeacherConfig, TrialConfig

TEACHER_SEED = 0  # one teacher per config, whatever the students' seeds: students are what the seeds measure
# Excluded from the trial hash: they change how a trial runs, not what it trains.
NON_SEMANTIC_FIELDS = {"name": True, "runtime": True}


class TeacherTrial(BaseModel):
    """The teacher's own training trial; students wait for it. Shared by hash across trials and experiments."""
    model_config = ConfigDict(frozen=True)
    config: TrialConfig
    hash: str


class PlannedTrial(BaseModel):
    """One student trial of an experiment, ready for the planner."""
    model_config = ConfigDict(frozen=True)
    label: str  # readable coordinates, e.g. "variant=adamixer distill.method=fgd seed=0"
    coords: dict[str, Any]  # ablated key -> value, plus "variant" (when there are variants) and "seed"
    config: TrialConfig  # the resolved trial; teacher.checkpoint is filled by the scheduler when teacher_ref is set
    hash: str  # trial_hash(config, teacher_ref): equal hashes are the same trial, run once
    teacher: Optional[TeacherTrial] = None  # the teacher trial to train first (None: no teacher or a checkpoint)
    teacher_ref: Optional[str] = None  # "trial:<teacher hash>", a runs:/ URI or hf:<repo>: where the teacher weights are

    @property
    def variant(self) -> Optional[str]:
        return self.coords.get("variant")

    @property
    def seed(self) -> int:
        return self.coords["seed"]


def trial_hash(config: TrialConfig, teacher_ref: Optional[str] = None) -> str:
    """First 12 hex digits of the sha256 of the trial's canonical JSON: its config without the non-semantic
    fields, the method's version and the dataset's identity (trainers.version), so a trial finished under other
    code or data is never reused. With `teacher_ref`, the teacher is identified by it (the teacher trial's hash,
    or an MLflow URI) instead of by wherever its checkpoint ends up on disk. ValueError when a COCO annotation
    file does not exist (validation reports that first)."""
    payload = config.model_dump(mode="json", exclude=NON_SEMANTIC_FIELDS)
    payload.update(method_version=version.METHOD_VERSION, dataset=version.dataset_identity(config.data))
    if teacher_ref is not None and payload.get("teacher") is not None:
        payload["teacher"]["checkpoint"] = teacher_ref
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def teacher_trial(spec: Spec) -> Optional[TrialConfig]:
    """The teacher's own training trial, or None when the spec has no teacher or gives its checkpoint."""
    if spec.teacher is None or spec.teacher.checkpoint is not None:
        return None
    return TrialConfig(name=f"{spec.name}/teacher", data=spec.data, model=spec.teacher.model,
                       schedule=spec.teacher.schedule, loss=spec.loss, seed=TEACHER_SEED,
                       runtime=spec.runtime).model_copy(deep=True)


def expand_trials(spec: Spec) -> list[PlannedTrial]:
    """Every trial of a validated spec: variants x ablate grid x seeds, in that nesting order."""
    trials = []
    for cell in grid_cells(spec.model_dump(exclude_unset=True), list(spec.ablate.items()), spec.variants):
        group = Spec.model_validate(cell.raw)
        teacher, teacher_ref, teacher_config = None, None, None
        if group.distill.method != "none":
            checkpoint = group.teacher.checkpoint
            teacher_config = TeacherConfig(model=group.teacher.model, label_map=group.teacher.label_map)
            if checkpoint is None:
                config = teacher_trial(group)
                teacher = TeacherTrial(config=config, hash=trial_hash(config))
                teacher_ref = f"trial:{teacher.hash}"
            elif checkpoint.startswith(("runs:/", "hf:")):
                teacher_ref = checkpoint
            else:
                teacher_config.checkpoint = Path(checkpoint)
        # a trial without distillation ignores the distill settings; dropping them lets the same baseline
        # be found by hash across experiments instead of being trained again
        distill = group.distill if group.distill.method != "none" else DistillConfig()
        for seed in spec.seeds:
            coords = {**cell.coords, "seed": seed}
            label = " ".join(f"{k}={value_label(v)}" for k, v in coords.items())
            config = TrialConfig(name=f"{spec.name}/{label}", data=group.data, model=group.student.model,
                                 schedule=group.student.schedule, loss=group.loss, seed=seed, distill=distill,
                                 runtime=group.runtime,
                                 teacher=teacher_config).model_copy(deep=True)
            trials.append(PlannedTrial(label=label, coords=coords, config=config,
                                       hash=trial_hash(config, teacher_ref), teacher=teacher,
                                       teacher_ref=teacher_ref))
    return trials


# ------------------------------------------------------------------------------------------- searches

@dataclasses.dataclass(frozen=True)
class SearchCell:
    """One search of a spec with a `search:` block: a cell of the variants x ablate grid, whose settings stay
    fixed while the search samples the searched keys."""
    index: int
    coords: dict[str, Any]  # ablated key (and "variant") -> value; {} without ablate or variants
    raw: dict  # the cell as a plain spec (JSON values): ablate, variants, search and table resolved away

    @property
    def key(self) -> str:
        """A folder and artifact name for the cell."""
        return f"cell-{self.index}"

    @property
    def label(self) -> str:
        return " ".join(f"{k}={value_label(v)}" for k, v in self.coords.items())


def search_cells(spec: Spec) -> list[SearchCell]:
    """The searches of a validated spec: one per variant x ablate cell, in expansion order."""
    data = spec.model_dump(mode="json", exclude_unset=True)
    cells = []
    for i, cell in enumerate(grid_cells(data, list(spec.ablate.items()), spec.variants)):
        raw = {k: v for k, v in cell.raw.items() if k not in ("search", "table")}
        cells.append(SearchCell(i, cell.coords, raw))
    return cells


def point_spec(cell: SearchCell, point: dict[str, Any], **top: Any) -> Spec:
    """The spec of one sampled point: the cell with the point's values set (and top-level keys such as name
    or description replaced by `top`), validated as a whole like any spec; raises SpecError. It has no
    search block, so `detrdistill run` of it trains exactly the trial that this point was."""
    raw = copy.deepcopy(cell.raw)
    for key, value in point.items():
        set_path(raw, tuple(key.split(".")), value)
    raw.update(top)
    return validate_spec(raw, file=f"search point {json.dumps(point, default=str)}")
