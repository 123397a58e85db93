"""Spec loading, validation and expansion (orchestrator/spec/). Fast: no torch, no Ray, no MLflow.

Malformed specs declare what they expect inline: a line ending in `# <- PATH` must produce a problem at
PATH on that line (several paths separated by ` & `), and nothing else may be reported.
"""
import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest

from orchestrator.spec import (PlannedTrial, SpecError, SpecProblem, expand_trials, load_spec,
                                           parse_spec, point_spec, search_cells, teacher_trial, trial_hash,
                                           validate_spec)
from trainers.config import DataConfig, DistillConfig, TeacherConfig, TrialConfig


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Relative paths in specs (data roots, checkpoints) resolve inside a fresh directory."""
    monkeypatch.chdir(tmp_path)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "train.json").write_text("{}")
    (coco / "train").mkdir()
    (coco / "val").mkdir()
    (tmp_path / "teacher.pth").write_bytes(b"")
    (tmp_path / "hf_dir").mkdir()
    return tmp_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def expected(text: str) -> set[tuple[str, int]]:
    marks = set()
    for number, line in enumerate(textwrap.dedent(text).lstrip("\n").splitlines(), start=1):
        match = re.search(r"# <-(.*)$", line)
        if match:
            marks |= {(path.strip(), number) for path in match.group(1).split(" & ")}
    return marks


# a valid spec to start from: ResNet-50 -> ResNet-18 Conditional DETR, both 6 decoder layers
OK = """
name: ok
teacher:
  model: {family: conditional_detr, backbone: resnet50}
student:
  model: {family: conditional_detr, backbone: resnet18}
distill: {method: detrdistill}
"""

MALFORMED = [
    pytest.param("""
        name: t
        nmae: x  # <- nmae
        student: {}
        """, [], ["did you mean 'name'"], id="unknown-key-top"),
    pytest.param("""
        name: t
        student:
          model:
            decoder_layer: 3  # <- student.model.decoder_layer
        """, [], ["did you mean 'decoder_layers'"], id="unknown-key-model"),
    pytest.param("""
        name: t
        teacher: {}
        student: {}
        distill:
          method: detrdistill
          logits:
            wieght: 2.0  # <- distill.logits.wieght
        """, [], ["unknown key 'wieght' in distill.logits"], id="unknown-key-deep"),
    pytest.param("""
        name: t
        student: {}
        resources:
          gpus: 1  # <- resources.gpus
        """, [], ["unknown key 'gpus'"], id="unknown-key-resources"),
    pytest.param("""
        name: t
        student:
          schedule: {epochs: ten}  # <- student.schedule.epochs
        """, [], ["expected an integer, got 'ten'"], id="wrong-type"),
    pytest.param("""
        name: t
        data:
          format: synthetic
          train_images: 2000  # <- data.train_images
          seed: 1  # <- data.seed
        student: {}
        """, [], ["expected a string (the training images' folder, relative to root; the synthetic task's size "
                  "is synthetic_train), got 2000", "unknown key 'seed' in data; did you mean 'synthetic_seed'?"],
        id="synthetic-size-as-folder"),
    pytest.param("""
        name: t
        student:
          schedule:
            lr: -1.0e-4  # <- student.schedule.lr
        """, [], ["expected a number > 0"], id="negative-lr"),
    pytest.param("""
        name: t
        student:
          model:
            decoder_layers: 0  # <- student.model.decoder_layers
        """, [], ["expected an integer >= 1, got 0"], id="decoder-layers-zero"),
    pytest.param("""
        name: t
        student: {}
        ablate:
          student.model.decoder_layers:
            - 3
            - 0  # <- ablate.student.model.decoder_layers[1]
        """, [], ["expected an integer >= 1, got 0"], id="decoder-layers-zero-via-ablate"),
    pytest.param("""
        name: t
        student:
          model:
            family: detr  # <- student.model.family
        """, [], ["expected one of conditional_detr, deformable_detr, adamixer, got 'detr'"], id="unknown-family"),
    pytest.param("""
        name: t
        teacher:
          model:
            backbone: resnet152  # <- teacher.model.backbone
        student: {}
        """, [], ["got 'resnet152'"], id="unknown-backbone"),
    pytest.param("""
        name: t
        teacher: {}
        student:
          model: {decoder_layers: 2}
        distill:
          method: detrdistill
          layer_mapping: [3, 4, 5]  # <- distill.layer_mapping
        """, [], ["has 3 entries, the student has 2 decoder layers"], id="mapping-wrong-length"),
    pytest.param("""
        name: t
        teacher: {}
        student:
          model: {decoder_layers: 2}
        distill:
          method: detrdistill
          layer_mapping:
            - 0
            - 6  # <- distill.layer_mapping[1]
        """, [], ["names teacher layers [6], the teacher has layers 0..5"], id="mapping-index-out-of-range"),
    pytest.param("""
        name: t
        teacher: {}
        student:
          model: {decoder_layers: 3}
        distill:
          method: detrdistill
          layer_mapping: layerwise  # <- distill.layer_mapping
        """, [], ["needs equal depths"], id="layerwise-unequal-depths"),
    pytest.param("""
        name: t
        student: {}
        distill:
          method: fgd  # <- distill.method
        """, [], ["no teacher"], id="distill-without-teacher"),
    pytest.param("""
        name: t
        data:
          format: coco
          root: coco
          train: annotations/train.json
          val: annotations/val.json  # <- data.val
        student: {}
        """, [], ["annotation file coco/annotations/val.json does not exist"], id="missing-annotation"),
    pytest.param("""
        name: t
        data:
          format: coco
          root: nowhere  # <- data.root
        student: {}
        """, [], ["--set data.format=synthetic"], id="missing-coco-root"),
    pytest.param("""
        name: t
        teacher:
          checkpoint: missing.pth  # <- teacher.checkpoint
        student: {}
        distill: {method: detrdistill}
        """, [], ["teacher checkpoint missing.pth does not exist"], id="missing-teacher-checkpoint"),
    pytest.param("""
        name: t
        teacher:
          checkpoint: hf_dir  # <- teacher.checkpoint
        student: {}
        """, [], ["no config.json"], id="checkpoint-dir-not-transformers"),
    pytest.param("""
        name: t
        student:
          model:
            family: conditional_detr
           backbone: resnet18  # <-
        """, [], ["YAML syntax error"], id="yaml-syntax-error"),
    pytest.param("""
        - name: t  # <-
        - student: {}
        """, [], ["this file holds a list"], id="not-a-mapping"),
    pytest.param("""
        name: !!python/object/apply:os.system ["echo hacked"]  # <-
        student: {}
        """, [], ["!!python/object/apply:os.system is not allowed"], id="python-tag"),
    pytest.param("""
        name: t
        student: {}
        table:
          rows: [student.model.backbone]  # <- table.rows[0]
        """, [], ["is not ablated or varied"], id="table-key-not-ablated"),
    pytest.param("""
        name: t
        student: {}
        ablate: {distill.method: [none]}
        table:
          columns: student.model.depth  # <- table.columns
        """, [], ["unknown key 'depth'"], id="table-key-unknown"),
    pytest.param("""
        name: t
        student: {}
        ablate: {student.model.backbone: [resnet18, resnet34]}
        table:
          rows: [student.model.backbone]
          metrics: [AP, mAP]  # <- table.metrics[1]
        """, [], ["got 'mAP'"], id="unknown-metric"),
    pytest.param("""
        name: t
        student: {}
        ablate: {distill.method: [none, fitnet]}
        teacher: {}
        table:
          columns: distill.method
          baseline: {distill.method: fgd}  # <- table.baseline.distill.method
        """, [], ["'fgd' is not one of the values of distill.method"], id="baseline-not-a-value"),
    pytest.param("""
        name: t
        student:
          model:
            family: adamixer
            encoder_layers: 2  # <- student.model.encoder_layers
        """, [], ["adamixer has no transformer encoder"], id="adamixer-encoder-layers"),
    pytest.param("""
        name: t
        student:
          model: {encoder_layers: 2}
        ablate:
          student.model.family: [conditional_detr, adamixer]  # <- ablate.student.model.family[1]
        """, [], ["student.model.encoder_layers: adamixer has no transformer encoder"],
        id="adamixer-encoder-layers-via-ablate"),
    pytest.param("""
        name: t
        student: {}
        seeds: [0, x]  # <- seeds[1]
        """, [], ["expected an integer, got 'x'"], id="seed-not-int"),
    pytest.param("""
        name: t
        student: {}
        seeds: [1, 1]  # <- seeds[1]
        """, [], ["duplicate seed 1"], id="seed-duplicate"),
    pytest.param("""
        name: t
        student: {}
        seeds: []  # <- seeds
        """, [], ["at least 1"], id="seeds-empty"),
    pytest.param("""
        name: t
        student: {}
        resources:
          gpus_per_trial: -1  # <- resources.gpus_per_trial
        """, [], [">= 0"], id="gpus-negative"),
    pytest.param("""
        name: t
        student: {}
        ablate:
          student.model.layers: [1, 2]  # <- ablate.student.model.layers
        """, [], ["unknown key 'layers' in student.model"], id="ablate-key-unknown"),
    pytest.param("""
        name: t
        student: {}
        ablate:
          resources.cpus_per_trial: [1, 2]  # <- ablate.resources.cpus_per_trial
        """, [], ["is not a trial setting"], id="ablate-key-not-a-trial-setting"),
    pytest.param("""
        name: t
        student: {}
        ablate:
          distill.method: none  # <- ablate.distill.method
        """, [], ["expected a list"], id="ablate-value-not-a-list"),
    pytest.param("""
        name: t
        student: {}
        ablate:
          distill.method: []  # <- ablate.distill.method
        """, [], ["at least 1"], id="ablate-empty-list"),
    pytest.param("""
        name: t
        student: {}
        ablate:
          distill.method: [none, none]  # <- ablate.distill.method[1]
        """, [], ["duplicate value 'none'"], id="ablate-duplicate-value"),
    pytest.param("""
        name: t
        student: {}
        ablate:
          student.model: [{backbone: resnet18}]
          student.model.decoder_layers: [2, 3]  # <- ablate.student.model.decoder_layers
        """, [], ["overlaps"], id="ablate-overlapping-keys"),
    pytest.param("""
        name: t
        student:
          model: {backbone: resnet18}
          model: {backbone: resnet34}  # <- student.model
        """, [], ["duplicate key 'model' (first at line 3)"], id="duplicate-yaml-key"),
    pytest.param("""
        name: t
        teacher: {}
        student: {}
        distill: {method: detrdistill, layer_mapping: [0, 2, 5]}
        ablate:
          student.model.decoder_layers:
            - 3
            - 2  # <- ablate.student.model.decoder_layers[1]
        """, [], ["distill.layer_mapping: explicit layer mapping has 3 entries, the student has 2"], id="mapping-invalid-in-one-cell"),
    pytest.param("""
        name: t
        student: {}
        ablate:
          distill.method: [none, detrdistill]  # <- ablate.distill.method[1]
        """, [], ["method detrdistill distils from a teacher"], id="distill-without-teacher-in-one-cell"),
    pytest.param("""
        name: t
        teacher: {}
        student: {}
        variants:
          a:
            student.model.depth: 3  # <- variants.a.student.model.depth
        """, [], ["unknown key 'depth'"], id="variant-key-unknown"),
    pytest.param("""
        name: t
        student: {}
        ablate: {distill.method: [none]}
        variants:
          a:
            distill.method: none  # <- variants.a.distill.method
        """, [], ["is also ablated"], id="variant-and-ablate-same-key"),
    pytest.param("""
        name: t
        student: {}
        variants:
          bad name: {}  # <- variants.bad name
        """, [], ["expected a name of letters"], id="variant-name-unsafe"),
    pytest.param("""
        name: my experiment  # <- name
        student: {}
        """, [], ["expected a name of letters"], id="name-unsafe"),
    pytest.param("""
        name: t  # <- student
        distill: {method: none}
        """, [], ["every experiment has a student"], id="missing-student"),
    pytest.param("""
        name: t
        teacher:
          model:
            family: deformable_detr  # <- teacher.model.family
        student:
          model:  # <- student.model.num_feature_levels
            family: conditional_detr
        distill: {method: detrdistill}
        """, [], ["same family", "has 1 level(s) and the teacher (deformable_detr) 4"], id="families-differ"),
    pytest.param("""
        name: t
        teacher:
          model: {family: conditional_detr, hidden_dim: 256}
        student:
          model:
            family: conditional_detr
            hidden_dim: 128  # <- student.model.hidden_dim
        distill: {method: detrdistill}
        """, [], ["teacher's 256-d queries"], id="query-prior-widths-differ"),
    pytest.param("""
        name: t
        teacher:
          model: {backbone: resnet50, backbone_dilation: true}
        student:
          model:  # <- student.model.backbone_dilation
            backbone: resnet18
        distill: {method: detrdistill}
        """, [], ["only the teacher has a dilated C5"], id="feature-maps-differ-in-size"),
    pytest.param("""
        name: t
        teacher:
          model: {family: adamixer, backbone: resnet50}
        student:
          model:
            family: adamixer
            finest_stride: 4  # <- student.model.finest_stride
        distill: {method: fitnet}
        """, [], ["student's finest level has stride 4 and the teacher's 8"], id="pyramids-differ"),
    pytest.param("""
        name: t
        teacher: {}
        student: {}
        distill:
          method: detrdistill
          layer_mapping: lst  # <- distill.layer_mapping
        """, [], ["expected one of layerwise, last, first, uniform, final or a list of integers, got 'lst'"],
        id="mapping-not-a-strategy"),
    pytest.param("""
        name: t
        student: {}
        search:
          space:
            student.schedule.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
          metrc: AP  # <- search.metrc
        """, [], ["did you mean 'metric'"], id="search-unknown-key"),
    pytest.param("""
        name: t
        student: {}
        search:
          space:
            student.schedule.lr: {type: loguniform, low: 0, high: 1.0e-3}  # <- search.space.student.schedule.lr.low
            student.schedule.weight_decay: {type: uniform, low: 0.1, high: 0.01}  # <- search.space.student.schedule.weight_decay.low
            student.model.num_queries: {type: uniform, low: 10, high: 100}  # <- search.space.student.model.num_queries.type
            student.model.dropout: {type: int, low: 0, high: 1.5}  # <- search.space.student.model.dropout.low
            student.model.family: {type: choice, values: [conditional_detr, detr]}  # <- search.space.student.model.family.values[1]
        """, [], ["loguniform needs low > 0", "low (0.1) must be below high (0.01)",
                  "student.model.num_queries is a whole number; search it with type: int",
                  "int needs whole numbers", "student.model.family=detr: expected one of"], id="search-bad-ranges"),
    pytest.param("""
        name: t
        teacher: {}
        student: {}
        distill: {method: detrdistill}
        ablate:
          distill.logits.weight: [0.5, 1.0]
        search:
          space:
            distill.logits.weight: {type: uniform, low: 0.1, high: 2.0}  # <- search.space.distill.logits.weight
            teacher.schedule.lr: {type: uniform, low: 0.1, high: 2.0}  # <- search.space.teacher.schedule.lr
            student.schedule.lrr: {type: uniform, low: 0.1, high: 2.0}  # <- search.space.student.schedule.lrr
        """, [], ["is also ablated", "the teacher is trained once and shared by every trial", "did you mean 'lr'"],
        id="search-keys-that-cannot-be-searched"),
    pytest.param("""
        name: t
        student:
          schedule: {epochs: 3, eval_every: 3}
        seeds: [0, 1]  # <- seeds
        search:
          space:
            student.schedule.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
          metric: AP  # <- search.metric
          scheduler: {grace_period: 3}  # <- search.scheduler.grace_period
        """, [], ["it takes one seed", "eval_every is 3", "leaves ASHA nothing to stop"], id="search-metric-asha-seeds"),
    pytest.param("""
        name: t
        student: {}
        search:
          space:
            student.schedule.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
          metric: train/loss
          mode: max  # <- search.mode
        """, [], ["mode max would maximise a training loss"], id="search-mode-against-metric"),
    pytest.param("""
        name: t
        teacher: {}
        student: {}
        distill: {method: detrdistill}
        ablate:
          student.model.decoder_layers: [6, 2]
        search:
          space:
            distill.layer_mapping:
              type: choice
              values:
                - last
                - layerwise  # <- search.space.distill.layer_mapping.values[1]
        """, [], ["'layerwise' mapping needs equal depths", "(with student.model.decoder_layers=2)"],
        id="search-value-impossible-in-one-cell"),
]


@pytest.mark.parametrize("text, overrides, says", MALFORMED)
def test_malformed_spec_is_refused_at_its_path_and_line(tmp_path, text, overrides, says):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    found = {(p.path, p.line) for p in info.value.problems}
    assert found == expected(text), str(info.value)
    assert len(info.value.problems) == len(found), str(info.value)
    report = str(info.value)
    for path_, line in expected(text):
        assert f"{path}:{line}: {path_ + ': ' if path_ else ''}" in report
    for words in says:
        assert words in report


PLAIN = "name: t\nstudent: {}\n"
SET_CASES = [
    pytest.param(PLAIN, ["student.model.decoder_layer=3"], "student.model.decoder_layer",
                 "did you mean 'decoder_layers'", id="set-unknown-key"),
    pytest.param(PLAIN, ["student.model.decoder_layers=[1"], "student.model.decoder_layers", "cannot read the value",
                 id="set-value-not-yaml"),
    pytest.param(PLAIN, ["student.model.decoder_layers=zero"], "student.model.decoder_layers", "expected an integer",
                 id="set-value-wrong-type"),
    pytest.param(PLAIN, ["student.model.decoder_layers"], "", "expected KEY=VALUE", id="set-without-value"),
    pytest.param(PLAIN, ["name.first=x"], "name.first", "is a single value", id="set-into-a-value"),
    pytest.param(PLAIN + "ablate: {distill.method: [none]}\n", ["ablate.distill.method=[fgd]"],
                 "ablate.distill.method[0]", "no teacher", id="set-ablate-values"),
]


@pytest.mark.parametrize("text, overrides, path, says", SET_CASES)
def test_bad_override_names_the_key_and_the_flag(tmp_path, text, overrides, path, says):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), overrides)
    [problem] = info.value.problems
    assert problem.path == path and problem.line is None
    assert says in problem.message and "(from --set " in problem.message


def test_override_of_an_ablated_key_is_refused(tmp_path):
    spec = write(tmp_path, "name: t\nstudent: {}\nablate: {student.model.decoder_layers: [2, 3]}\n")
    with pytest.raises(SpecError, match=r"is ablated; override its values instead: --set ablate.student.model"):
        load_spec(spec, ["student.model.decoder_layers=4"])


def test_all_problems_are_reported_at_once(tmp_path):
    text = """
        name: several
        nmae: typo  # <- nmae
        teacher:
          model: {decoder_layers: 4}
          schedule: {batch_size: 0}  # <- teacher.schedule.batch_size
        student:
          model:
            decoder_layers: 2
            backbone: resnet18
          schedule:
            lr: -1  # <- student.schedule.lr
            epochs: 0  # <- student.schedule.epochs
        distill:
          method: detrdistill
          layer_mapping: [0, 9]  # <- distill.layer_mapping[1]
        ablate:
          student.model.width: [1]  # <- ablate.student.model.width
        seeds: [0, 0]  # <- seeds[1]
        table:
          metrics: [AP, AP99]  # <- table.metrics[1]
        resources: {cpus_per_trial: 0}  # <- resources.cpus_per_trial
        """
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), ["student.model.num_querys=3"])
    found = {(p.path, p.line) for p in info.value.problems}
    assert found == expected(text) | {("student.model.num_querys", None)}, str(info.value)
    lines = str(info.value).splitlines()
    assert len(lines) == len(found)
    numbered = [p.line for p in info.value.problems if p.line is not None]
    assert numbered == sorted(numbered)  # reported in file order, command-line problems last


def test_missing_file_and_directory_are_clear(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: no such file"
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def test_empty_file_is_not_a_spec(tmp_path):
    with pytest.raises(SpecError, match="holds nothing"):
        load_spec(write(tmp_path, ""))


def test_tabs_get_a_hint():
    with pytest.raises(SpecError, match="indents with spaces"):
        parse_spec("name: t\nstudent:\n\tmodel: {}\n")


def test_problem_format():
    assert SpecProblem("a.b", 3, "bad").format("f.yaml") == "f.yaml:3: a.b: bad"
    assert SpecProblem("", None, "bad").format("f.yaml") == "f.yaml: bad"
    assert str(SpecError("f.yaml", [SpecProblem("a", 1, "x"), SpecProblem("b", 2, "y")])) == \
        "f.yaml:1: a: x\nf.yaml:2: b: y"


def test_validate_spec_takes_a_dict():
    spec = validate_spec({"name": "d", "student": {"model": {"backbone": "resnet18"}}})
    assert spec.student.model.backbone == "resnet18"
    with pytest.raises(SpecError) as info:
        validate_spec({"name": "d", "student": {"model": {"decoder_layers": 0}}})
    assert info.value.problems == [SpecProblem("student.model.decoder_layers", None,
                                               "expected an integer >= 1, got 0")]


def test_valid_checkpoints_pass(tmp_path):
    (tmp_path / "hf_dir" / "config.json").write_text("{}")
    for checkpoint in ("teacher.pth", "hf_dir", "runs:/0123abcd/model"):
        spec = parse_spec(OK + f"  \nablate: {{distill.method: [none, detrdistill]}}\n",
                          overrides=[f"teacher.checkpoint={checkpoint}"])
        assert teacher_trial(spec) is None
        distilled = [t for t in expand_trials(spec) if t.config.distill.method == "detrdistill"][0]
        assert distilled.teacher is None
        if checkpoint.startswith("runs:/"):
            assert distilled.teacher_ref == checkpoint and distilled.config.teacher.checkpoint is None
        else:
            assert distilled.teacher_ref is None and distilled.config.teacher.checkpoint == Path(checkpoint)
    with pytest.raises(SpecError, match="expected an MLflow URI"):
        parse_spec(OK, overrides=["teacher.checkpoint=runs:/"])


def test_valid_coco_data_passes(tmp_path):
    (tmp_path / "coco" / "annotations" / "val.json").write_text("{}")
    spec = parse_spec(OK, overrides=["data={format: coco, root: coco, train: annotations/train.json, "
                                     "val: annotations/val.json}"])
    assert spec.data.format == "coco"


def test_yaml_safe_load_never_runs_code(tmp_path):
    marker = tmp_path / "hacked"
    text = f'name: !!python/object/apply:os.system ["touch {marker}"]\nstudent: {{}}\n'
    with pytest.raises(SpecError):
        parse_spec(text)
    assert not marker.exists()


# -------------------------------------------------------------------------------------------- expansion

GRID = """
name: grid
teacher:
  model: {backbone: resnet50, decoder_layers: 6}
  schedule: {epochs: 3}
student:
  model: {backbone: resnet18}
  schedule: {epochs: 2}
distill: {method: detrdistill, layer_mapping: last, query_prior: {weight: 0}}  # widths differ
variants:
  small: {student.model.hidden_dim: 128}
  big: {student.model.hidden_dim: 256}
ablate:
  student.model.decoder_layers: [6, 4, 2]
  distill.method: [none, detrdistill]
seeds: [0, 1]
table: {rows: [student.model.decoder_layers], columns: distill.method, baseline: {distill.method: none}}
"""


def test_expansion_is_variants_x_grid_x_seeds():
    trials = expand_trials(parse_spec(GRID))
    assert len(trials) == 2 * 3 * 2 * 2
    assert all(isinstance(t, PlannedTrial) for t in trials)
    first, last = trials[0], trials[-1]
    assert first.coords == {"variant": "small", "student.model.decoder_layers": 6, "distill.method": "none", "seed": 0}
    assert last.coords == {"variant": "big", "student.model.decoder_layers": 2, "distill.method": "detrdistill",
                           "seed": 1}
    assert last.label == "variant=big student.model.decoder_layers=2 distill.method=detrdistill seed=1"
    assert (last.variant, last.seed) == ("big", 1)
    config = last.config
    assert (config.model.hidden_dim, config.model.decoder_layers, config.model.backbone) == (256, 2, "resnet18")
    assert config.seed == 1 and config.schedule.epochs == 2 and config.distill.method == "detrdistill"
    assert config.teacher.model.backbone == "resnet50" and config.teacher.checkpoint is None
    assert len({t.hash for t in trials}) == len(trials)


def test_teacher_is_planned_once_and_students_depend_on_it():
    spec = parse_spec(GRID)
    trials = expand_trials(spec)
    teachers = {t.teacher.hash for t in trials if t.teacher is not None}
    assert len(teachers) == 1
    own = teacher_trial(spec)
    assert own is not None and trial_hash(own) in teachers
    assert (own.model.backbone, own.schedule.epochs, own.distill.method, own.teacher) == ("resnet50", 3, "none", None)
    for t in trials:
        if t.config.distill.method == "none":
            assert t.teacher is None and t.config.teacher is None and t.teacher_ref is None
        else:
            assert t.teacher_ref == f"trial:{t.teacher.hash}"


def test_hashes_are_stable_and_ignore_the_name():
    a, b = expand_trials(parse_spec(GRID)), expand_trials(parse_spec(GRID.replace("name: grid", "name: other")))
    assert [t.hash for t in a] == [t.hash for t in b]
    assert a[0].config.name != b[0].config.name
    config = a[5].config
    assert trial_hash(config) == trial_hash(config.model_copy(deep=True))
    assert trial_hash(config) == trial_hash(config.model_copy(update={"runtime": config.runtime.model_copy(update={"threads": 3})}))
    compiled = config.model_copy(update={"runtime": config.runtime.model_copy(update={"compile": True})})
    assert trial_hash(config) == trial_hash(compiled)  # a way to run it, not another trial
    for way in ("cuda_graph", "teacher_cuda_graph"):
        graphed = config.model_copy(update={"runtime": config.runtime.model_copy(update={way: True})})
        assert trial_hash(config) == trial_hash(graphed), way
    assert trial_hash(config) != trial_hash(config.model_copy(update={"seed": config.seed + 1}))


def test_the_hash_is_the_config_with_the_method_version_and_the_dataset(tmp_path, monkeypatch):
    """Pinned by a reconstruction: the sha256 of the canonical JSON of the config (without name and runtime), the
    method's version and the dataset's identity. Another method version, synthetic generator or COCO annotation
    file makes another trial, so what was finished under the old one is trained again, never reused."""
    from trainers import version
    config = TrialConfig(data=DataConfig(root="data/x"), teacher=TeacherConfig(),
                         distill=DistillConfig(method="detrdistill"))

    def expected(config, dataset, teacher_ref=None):
        payload = config.model_dump(mode="json")
        del payload["name"], payload["runtime"]
        if teacher_ref is not None:
            payload["teacher"]["checkpoint"] = teacher_ref
        payload.update(method_version=version.METHOD_VERSION, dataset=dataset)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]

    generator = {"synthetic": version.GENERATOR_VERSION}
    synthetic = trial_hash(config)
    assert synthetic == expected(config, generator)
    assert trial_hash(config, "trial:abc") == expected(config, generator, teacher_ref="trial:abc")
    with monkeypatch.context() as patch:
        patch.setattr(version, "METHOD_VERSION", version.METHOD_VERSION + 1)
        assert trial_hash(config) == expected(config, generator) != synthetic
    with monkeypatch.context() as patch:
        patch.setattr(version, "GENERATOR_VERSION", version.GENERATOR_VERSION + 1)
        assert trial_hash(config) == expected(config, {"synthetic": version.GENERATOR_VERSION}) != synthetic

    train, val = tmp_path / "coco" / "annotations" / "train.json", tmp_path / "coco" / "annotations" / "val.json"
    val.write_text('{"images": []}')
    coco = config.model_copy(update={"data": DataConfig(format="coco", root="coco", train="annotations/train.json",
                                                        val="annotations/val.json")})
    digest = {"train": hashlib.sha256(b"{}").hexdigest(), "val": hashlib.sha256(b'{"images": []}').hexdigest()}
    before = trial_hash(coco)
    assert before == expected(coco, {"coco": digest})
    train.write_text('{"images": [], "annotations": []}')  # another annotation file: another trial
    digest["train"] = hashlib.sha256(b'{"images": [], "annotations": []}').hexdigest()
    assert trial_hash(coco) == expected(coco, {"coco": digest}) != before
    val.unlink()
    with pytest.raises(ValueError, match=f"annotation file {re.escape(str(val))} does not exist"):
        trial_hash(coco)


@pytest.mark.parametrize("change", [
    "student.schedule.lr=1.0e-4", "student.model.num_queries=100", "data.synthetic_seed=1", "loss.cls_weight=1.0",
    "data.augment.flip=0.0", "distill.logits.weight=0.5", "distill.layer_mapping=uniform"])
def test_any_semantic_change_changes_the_hash(change):
    before = {t.label: t.hash for t in expand_trials(parse_spec(GRID))}
    after = {t.label: t.hash for t in expand_trials(parse_spec(GRID, overrides=[change]))}
    distilled = [label for label in before if "detrdistill" in label]
    assert all(before[label] != after[label] for label in (distilled if change.startswith("distill") else before))


def test_teacher_change_changes_the_students_hash():
    before = expand_trials(parse_spec(GRID))
    after = expand_trials(parse_spec(GRID, overrides=["teacher.schedule.epochs=4"]))
    for b, a in zip(before, after):
        assert (b.hash == a.hash) == (b.config.distill.method == "none")


def test_undistilled_trials_drop_distill_settings_and_are_shared():
    plain = expand_trials(parse_spec(GRID))[0]
    tuned = expand_trials(parse_spec(GRID, overrides=["distill.logits.weight=3", "teacher.model.backbone=resnet34"]))[0]
    assert plain.config.distill.method == "none" and plain.hash == tuned.hash


def test_teachers_dedupe_across_experiments():
    quick = parse_spec(GRID)
    other = parse_spec(GRID.replace("name: grid", "name: g2"),
                       overrides=["ablate.distill.method=[detrdistill]", "table.baseline=null"])
    assert {t.teacher.hash for t in expand_trials(quick) if t.teacher} == \
        {t.teacher.hash for t in expand_trials(other) if t.teacher}


def test_overrides_are_applied_and_win_over_variants():
    spec = parse_spec(GRID, overrides=["student.schedule.epochs=7", "student.model.hidden_dim=64", "seeds=[3]",
                                       "ablate.student.model.decoder_layers=[1]",
                                       "variants.big.student.model.dropout=0.0"])
    trials = expand_trials(spec)
    assert len(trials) == 2 * 1 * 2 * 1
    assert {t.config.schedule.epochs for t in trials} == {7}
    assert {t.config.model.hidden_dim for t in trials} == {64}
    assert {t.config.seed for t in trials} == {3}
    assert [t.config.model.dropout for t in trials if t.variant == "big"] == [0.0, 0.0]


def test_override_reaches_inside_a_variant_mapping():
    text = GRID.replace("small: {student.model.hidden_dim: 128}", "small: {student.schedule: {epochs: 9, lr: 1.0e-3}}")
    spec = parse_spec(text, overrides=["student.schedule.epochs=1"])
    small = [t for t in expand_trials(spec) if t.variant == "small"]
    assert {(t.config.schedule.epochs, t.config.schedule.lr) for t in small} == {(1, 1.0e-3)}


def test_no_ablation_gives_one_trial_per_seed():
    trials = expand_trials(parse_spec("name: one\nstudent: {}\nseeds: [0, 1, 2]\n"))
    assert [t.coords for t in trials] == [{"seed": 0}, {"seed": 1}, {"seed": 2}]
    assert all(t.teacher is None for t in trials)


def test_trials_are_independent_copies():
    trials = expand_trials(parse_spec(GRID))
    trials[0].config.schedule.epochs = 99
    assert trials[1].config.schedule.epochs == 2


def test_adamixer_variant_keeps_encoder_unset():
    text = """
name: fam
teacher: {model: {decoder_layers: 6}}
student: {model: {decoder_layers: 6}}
distill: {method: detrdistill}
variants:
  cond: {teacher.model.family: conditional_detr, student.model.family: conditional_detr}
  ada: {teacher.model.family: adamixer, student.model.family: adamixer}
"""
    trials = expand_trials(parse_spec(text))
    assert [t.config.model.family for t in trials] == ["conditional_detr", "adamixer"]
    assert len({t.teacher.hash for t in trials}) == 2


SEARCH = OK + """
ablate:
  student.model.decoder_layers: [6, 2]
search:
  space:
    distill.logits.weight: {type: loguniform, low: 0.1, high: 10.0}
    student.model.num_queries: {type: int, low: 50, high: 300}
  scheduler: {type: asha}
"""


def test_a_search_is_one_per_cell_and_a_point_is_a_spec_of_its_own():
    spec = parse_spec(SEARCH)
    assert spec.search.direction == "max" and spec.search.metric == "AP" and spec.search.sampler.type == "tpe"
    cells = search_cells(spec)
    assert [c.coords for c in cells] == [{"student.model.decoder_layers": 6}, {"student.model.decoder_layers": 2}]
    assert cells[1].label == "student.model.decoder_layers=2" and cells[1].key == "cell-1"
    point = point_spec(cells[1], {"distill.logits.weight": 0.5, "student.model.num_queries": 100}, name="p")
    assert point.search is None and point.ablate == {} and point.name == "p"
    assert (point.student.model.decoder_layers, point.student.model.num_queries) == (2, 100)
    assert point.distill.logits.weight == 0.5
    # the cell itself, with no point, is the trial the grid would run (same hash)
    assert [expand_trials(point_spec(c, {}))[0].hash for c in cells] == [t.hash for t in expand_trials(spec)]
    with pytest.raises(SpecError, match="distill.logits.weight: expected a number >= 0"):
        point_spec(cells[0], {"distill.logits.weight": -1.0})


def test_search_overrides_reach_inside_the_space():
    spec = parse_spec(SEARCH, overrides=["search.space.distill.logits.weight.high=100", "search.num_samples=2",
                                         "search.space.student.schedule.lr={type: loguniform, low: 1.0e-5, high: 1.0e-3}"])
    assert spec.search.space["distill.logits.weight"].high == 100 and spec.search.num_samples == 2
    assert spec.search.space["student.schedule.lr"].type == "loguniform"
    with pytest.raises(SpecError, match=r"search.space.distill.logits.weight.low: .*must be below high"):
        parse_spec(SEARCH, overrides=["search.space.distill.logits.weight.low=20"])
