"""`detrdistill validate`: exit codes, output, the shipped experiments, and that it writes nothing."""
import os
import re
import subprocess
import sys
from itertools import takewhile
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.spec import expand_trials, load_spec

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
PAPER_SPECS = [p for p in EXPERIMENTS if "format: coco" in p.read_text()]

GOOD = ("name: good\nteacher: {}\nstudent: {model: {backbone: resnet18}}\n"
        "ablate: {distill.method: [none, detrdistill]}\n")
BAD = "name: bad\nstudent:\n  model:\n    decoder_layers: 0\n  schedule: {lr: -1}\n"


def documented_overrides(spec: Path) -> list[str]:
    """The `--set` flags a spec's header comment documents for a small synthetic run."""
    header = takewhile(lambda line: line.startswith("#"), spec.read_text().splitlines())
    return [flag for line in header for flag in re.findall(r"--set\s+(\S+)", line)]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text(BAD)
    return tmp_path


def test_experiments_exist():
    names = {p.name for p in EXPERIMENTS}
    assert {"quickstart.yaml", "table3_methods.yaml", "table4_depth.yaml", "fig5_layer_mapping.yaml",
            "table10_backbones.yaml", "components.yaml"} <= names


@pytest.mark.parametrize("spec", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_validates_with_its_documented_overrides(spec, workdir, capsys):
    overrides = documented_overrides(spec)
    if spec in PAPER_SPECS:
        assert "data.format=synthetic" in overrides, "a COCO spec must document how to run it on synthetic data"
    args = ["validate", str(spec)] + [a for flag in overrides for a in ("--set", flag)]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert re.fullmatch(rf"{re.escape(str(spec))}: ok: \S+: \d+ trials?.*\n", out)


def test_paper_specs_fail_cleanly_without_coco(workdir, capsys):
    assert PAPER_SPECS
    assert main(["validate", *map(str, PAPER_SPECS)]) == 2
    err = capsys.readouterr().err
    for spec in PAPER_SPECS:
        line = next(n for n, text in enumerate(spec.read_text().splitlines(), 1) if text.strip() == "root: data/coco")
        assert f"{spec}:{line}: data.root: COCO root data/coco is not a directory" in err
        assert f"{spec}: 1 problem; fix it" in err
    assert "--set data.format=synthetic" in err


def test_valid_spec_exits_0_with_a_summary(workdir, capsys):
    assert main(["validate", "good.yaml"]) == 0
    out, err = capsys.readouterr()
    assert out == "good.yaml: ok: good: 2 trials, 1 teacher trained first (conditional_detr resnet101)\n"
    assert err == ""


def test_invalid_spec_exits_2_with_one_line_per_problem(workdir, capsys):
    assert main(["validate", "bad.yaml"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "bad.yaml:4: student.model.decoder_layers: expected an integer >= 1, got 0",
        "bad.yaml:5: student.schedule.lr: expected a number > 0.0, got -1",
        "bad.yaml: 2 problems; fix them in the file (or override with --set KEY=VALUE) and run "
        "`detrdistill validate bad.yaml` again",
    ]


def test_every_spec_is_checked_and_any_failure_gives_2(workdir, capsys):
    assert main(["validate", "good.yaml", "missing.yaml", "bad.yaml"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("good.yaml: ok: good")
    assert "missing.yaml: no such file" in err and "bad.yaml:4: student.model.decoder_layers" in err


def test_set_overrides_reach_validation(workdir, capsys):
    assert main(["validate", "bad.yaml", "--set", "student.model.decoder_layers=2",
                 "--set", "student.schedule.lr=1.0e-4", "--set", "seeds=[0, 1]"]) == 0
    assert "ok: bad: 2 trials" in capsys.readouterr().out
    assert main(["validate", "good.yaml", "--set", "student.model.decoder_layers=0"]) == 2
    err = capsys.readouterr().err
    assert "good.yaml: student.model.decoder_layers: expected an integer >= 1, got 0 " \
           "(from --set student.model.decoder_layers=0)" in err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "validate" in capsys.readouterr().out


def test_validate_writes_nothing(workdir, capsys):
    before = tree(workdir)
    main(["validate", "good.yaml", "bad.yaml", *map(str, EXPERIMENTS)])
    assert tree(workdir) == before  # no mlflow.db, mlruns/, results/, data/


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_as_a_program(workdir):
    before = tree(workdir)
    ok = run_cli(workdir, "validate", "good.yaml")
    assert ok.returncode == 0 and ok.stdout.startswith("good.yaml: ok: good: 2 trials"), ok.stderr
    bad = run_cli(workdir, "validate", "good.yaml", "bad.yaml")
    assert bad.returncode == 2
    assert "bad.yaml:4: student.model.decoder_layers: expected an integer >= 1, got 0" in bad.stderr
    assert tree(workdir) == before


def test_validate_imports_no_heavy_framework(workdir):
    code = ("import sys; from orchestrator.cli import main; main(['validate', 'good.yaml']); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_validate_plan_lists_trials_and_what_the_store_holds(workdir, capsys):
    """--plan: teachers first, one line per trial with its hash; a result.json makes it finished (with its AP),
    a checkpoint alone started, nothing to train; the store is only read."""
    trials = expand_trials(load_spec("good.yaml"))
    teacher, plain, distilled = trials[1].teacher.hash, trials[0].hash, trials[1].hash
    store = workdir / "store"
    (store / teacher).mkdir(parents=True)
    (store / teacher / "result.json").write_text('{"metrics": {"AP": 0.4125}}')
    (store / plain).mkdir()
    (store / plain / "checkpoint.pt").write_bytes(b"")
    before = tree(workdir)
    assert main(["validate", "good.yaml", "--plan", "--store", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("good.yaml: ok: good: 2 trials") and len(lines) == 4
    assert lines[1].split()[0] == "teacher" and teacher in lines[1] and "finished (AP 0.4125)" in lines[1]
    assert lines[2].split()[0] == "distill.method=none" and plain in lines[2] and "started" in lines[2]
    assert lines[3].split()[0] == "distill.method=detrdistill" and distilled in lines[3]
    assert lines[3].endswith("to train") and "resnet18 6+6 layers, 50 epochs" in lines[3]
    assert tree(workdir) == before


@pytest.mark.parametrize("spec", PAPER_SPECS, ids=lambda p: p.stem)
def test_paper_specs_follow_the_official_recipe(spec, workdir):
    """ImageNet backbones, the 500-iteration warm-up from 0.001 x lr and fp32, for every teacher and student."""
    from orchestrator.spec import expand_trials, load_spec
    trials = expand_trials(load_spec(spec, ["data.format=synthetic"]))
    configs = [t.config for t in trials] + [t.teacher.config for t in trials if t.teacher is not None]
    for config in configs:
        assert config.model.backbone_weights == "imagenet", config.name
        assert (config.schedule.warmup_iters, config.schedule.warmup_ratio, config.schedule.amp) == (500, 0.001, False)
    for config in (t.config for t in trials):
        assert config.teacher is None or config.teacher.model.backbone_weights == "imagenet"


def test_the_official_recipe_switches_validate(workdir, capsys):
    args = ["validate", str(REPO / "experiments" / "quickstart.yaml"), "--set", "distill.contrastive.weight=0.2",
            "--set", "distill.query_prior.assignment=self", "--set", "student.model.backbone_weights=imagenet"]
    assert main(args) == 0
    assert main(args[:-2] + ["--set", "distill.query_prior.assignment=group"]) == 2
    assert "distill.query_prior.assignment" in capsys.readouterr().err
