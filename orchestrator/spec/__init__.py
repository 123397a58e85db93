"""An experiment spec: the YAML a researcher writes, its validation, and its expansion into trials.

A spec embeds the trial models of trainers/config.py (data, model, schedule, loss, distillation) and adds what
only an experiment has: the ablation grid, named variants, seeds, the table to print, resources and tracking.
`load_spec` refuses a bad spec before anything runs and reports every problem at once, each with its dotted
path and YAML line. Nothing here touches tensors, Ray or MLflow, and nothing is written to disk.

  schema.py   the pydantic models (Spec and its parts)
  load.py     YAML with line numbers, --set overrides, validation
  checks.py   the rules beyond the schema: grid, trial groups, files, teacher/student, table, search
  errors.py   SpecProblem, SpecError and the wording of every problem
  raw.py      dotted keys into the raw (unvalidated) spec, and the cells of the grid
  expand.py   trials and their hashes, searches and the spec of a sampled point
"""
from orchestrator.spec.errors import SpecError, SpecProblem
from orchestrator.spec.expand import (PlannedTrial, SearchCell, TeacherTrial, expand_trials, point_spec, search_cells,
                                      teacher_trial, trial_hash)
from orchestrator.spec.load import load_spec, parse_spec, validate_spec
from orchestrator.spec.schema import (AshaSpec, ResourcesSpec, SamplerSpec, SearchParam, SearchSpec, Spec, StudentSpec,
                                      TableSpec, TeacherSpec, TrackingSpec)

__all__ = ["AshaSpec", "PlannedTrial", "ResourcesSpec", "SamplerSpec", "SearchCell", "SearchParam", "SearchSpec",
           "Spec", "SpecError", "SpecProblem", "StudentSpec", "TableSpec", "TeacherSpec", "TeacherTrial",
           "TrackingSpec", "expand_trials", "load_spec", "parse_spec", "point_spec", "search_cells", "teacher_trial",
           "trial_hash", "validate_spec"]
