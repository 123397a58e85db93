"""Hyperparameter search (orchestrator/search.py) on a real local Ray, Optuna and MLflow (SQLite), tiny trials:
a search with a shared teacher, interrupted by Ctrl-C and resumed to exactly num_samples trials, whose best
configuration reproduces the best trial; ASHA stopping a trial early in a case built for it, with two trials
running at once. The search block's validation is tested in test_spec.py."""
import glob
import json
import os
import signal
import threading
import time
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from conftest import tiny_spec
from orchestrator.cli import main
from orchestrator.plan import build_plan
from orchestrator.search import max_overlap
from orchestrator.spec import load_spec

KD_SEARCH = """distill: {method: detrdistill}
search:
  space:
    distill.logits.weight: {type: loguniform, low: 0.1, high: 10.0}
    student.schedule.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
  metric: train/loss_cls
  num_samples: 3
  max_concurrent: 2
"""


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def epochs_logged(uri: str, run) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "epoch_time"))


def test_max_overlap():
    assert max_overlap([]) == 0
    assert max_overlap([(0, 2), (1, 3), (2, 4)]) == 2  # the first ends as the third starts
    assert max_overlap([(0, 5), (1, 2), (1.5, 3)]) == 3


def test_search_with_a_shared_teacher_interrupted_and_resumed(ray_cluster, tiny_data_root, tmp_path, monkeypatch,
                                                              tracking_uri, capsys):
    """Ctrl-C once Tune has a trial's first checkpoint; `detrdistill resume` finishes the search with
    the searcher's state: exactly num_samples trials, one MLflow child run each with every epoch once, the
    interrupted trial resumed from its checkpoint, the teacher trained once for all of them."""
    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text(tiny_spec(tiny_data_root, "kd-search", extra=KD_SEARCH))
    interrupted = []

    def interrupt_after_first_checkpoint():  # once Tune has taken in an epoch's result and checkpoint
        deadline = time.time() + 240
        while not any(Path(f).stat().st_size for f in glob.glob("runs/searches/*/*/tune/cell-0/*/result.json")) \
                and time.time() < deadline:
            time.sleep(0.05)
        interrupted.append(time.time())
        os.kill(os.getpid(), signal.SIGINT)  # Tune's handler: stop, save the experiment state

    watcher = threading.Thread(target=interrupt_after_first_checkpoint, daemon=True)
    watcher.start()
    assert main(["run", "s.yaml", "--tracking-uri", tracking_uri, "--set", "data.limit_train=4"]) == 130
    watcher.join()
    out = capsys.readouterr().out
    assert interrupted and f"Resume with:  detrdistill resume kd-search --tracking-uri {tracking_uri}" in out
    [parent] = [r for r in runs_of(tracking_uri, "kd-search") if r.data.tags.get("detrdistill.kind") == "search"]
    assert parent.info.status == "KILLED"

    assert main(["resume", "kd-search", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "teacher: finished earlier in this experiment; not trained again" in out
    assert "concurrency: max 2 of max_concurrent 2" in out  # the two resumed trials ran at once

    runs = runs_of(tracking_uri, "kd-search")
    [parent] = [r for r in runs if r.data.tags.get("detrdistill.kind") == "search"]
    trials = [r for r in runs if r.data.tags.get("detrdistill.kind") == "trial"]
    [teacher] = [r for r in runs if r.data.tags.get("detrdistill.kind") == "teacher"]
    assert parent.info.status == "FINISHED" and teacher.data.tags["detrdistill.status"] == "finished"
    assert len(trials) == 3 and len({r.data.tags["detrdistill.tune_trial_id"] for r in trials}) == 3
    search_dir = Path(parent.data.tags["detrdistill.search_dir"])
    assert len(list((search_dir / "tune" / "cell-0").glob("*/params.json"))) == 3  # Tune made no fourth trial
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["detrdistill.status"] == "finished" and run.info.status == "FINISHED"
        assert set(run.data.params) == {"distill.logits.weight", "student.schedule.lr"}
        assert epochs_logged(tracking_uri, run) == [1, 2]  # every epoch once, across the interruption
        assert "train/kd_logits" in run.data.metrics
    logs = [(search_dir / "trials" / r.data.tags["detrdistill.tune_trial_id"] / "log.txt").read_text() for r in trials]
    assert any("resumes from its checkpoint" in log and "resuming after epoch 1" in log for log in logs)

    # one teacher, trained once, read by every trial
    teacher_dir = Path(teacher.data.tags["detrdistill.store_path"])
    assert (teacher_dir / "log.txt").read_text().count(" starts\n") == 1
    configs = [json.loads((search_dir / "trials" / r.data.tags["detrdistill.tune_trial_id"] / "trial.json").read_text())
               for r in trials]
    assert {c["teacher"]["checkpoint"] for c in configs} == {str(teacher_dir / "checkpoint.pt")}

    # Optuna's study, where optuna-dashboard finds it: the three trials, told their results
    db = f"sqlite:///{search_dir / 'optuna.db'}"
    assert f"optuna-dashboard {db}" in out
    [summary] = optuna.get_all_study_summaries(db)
    study = optuna.load_study(study_name=summary.study_name, storage=db)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3

    # the best configuration: a valid spec that plans exactly the best trial (same hash, same config)
    client = MlflowClient(tracking_uri)
    assert {f.path for f in client.list_artifacts(parent.info.run_id)} == {
        "spec.yaml", "best_config.yaml", "search_metric_per_trial.png", "param_importances.png"}
    [best] = [r for r in trials if r.data.tags.get("detrdistill.best") == "true"]
    assert best.data.metrics["train/loss_cls"] == min(r.data.metrics["train/loss_cls"] for r in trials)
    best_file = tmp_path / "results" / "kd-search" / "best_config.yaml"
    assert main(["validate", str(best_file)]) == 0
    plan = build_plan(load_spec(best_file), "runs")
    [student] = [n for n in plan.nodes.values() if n.kind == "trial"]
    [plan_teacher] = [n for n in plan.nodes.values() if n.kind == "teacher"]
    assert student.hash == best.data.tags["detrdistill.trial_hash"]
    assert plan_teacher.hash == teacher.data.tags["detrdistill.trial_hash"]
    best_config = configs[trials.index(best)]
    assert {**student.config.model_dump(mode="json"), "name": None} == {**best_config, "name": None}
    best_spec = load_spec(best_file).model_dump()
    for key, value in best.data.params.items():  # the sampled values, written into the spec
        section, *rest = key.split(".")
        found = best_spec[section]
        for part in rest:
            found = found[part]
        assert str(found) == value


def test_asha_stops_a_bad_trial_early_while_two_run_at_once(ray_cluster, tiny_data_root, tmp_path, monkeypatch,
                                                            tracking_uri, capsys):
    """Built to stop: TPE seeded 1 draws its first (random) learning rates 1.2e-5, 4.0e-4, then 1.0e-7.
    The third trial starts only when one of the first two has ended (max_concurrent 2), so at ASHA's rung
    (epoch 1) it is compared with at least one of them; an lr of 1e-7 leaves the training loss where it
    started, so it is below their median and stopped after epoch 1, whatever order the first two report in."""
    monkeypatch.chdir(tmp_path)
    Path("a.yaml").write_text(tiny_spec(tiny_data_root, "asha", teacher=False, extra="""search:
  space:
    student.schedule.lr: {type: loguniform, low: 1.0e-7, high: 1.0e-2}
  metric: train/loss
  num_samples: 3
  max_concurrent: 2
  sampler: {type: tpe, seed: 1}
  scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
"""))
    assert main(["run", "a.yaml", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "stopped early by ASHA after epoch 1/2" in out
    assert "concurrency: max 2 of max_concurrent 2" in out  # the first two trials ran at once

    trials = [r for r in runs_of(tracking_uri, "asha") if r.data.tags.get("detrdistill.kind") == "trial"]
    assert len(trials) == 3
    stopped = [r for r in trials if r.data.tags["detrdistill.early_stopped"] == "true"]
    assert stopped and all(epochs_logged(tracking_uri, r) == [1] for r in stopped)
    assert all(epochs_logged(tracking_uri, r) == [1, 2] for r in trials if r not in stopped)
    slowest = min(trials, key=lambda r: float(r.data.params["student.schedule.lr"]))
    assert float(slowest.data.params["student.schedule.lr"]) < 1e-6 and slowest in stopped
    assert all(r.data.tags["detrdistill.status"] == "finished" for r in trials)


def test_tune_runs_without_optunas_already_reported_warning_only():
    """A resumed search re-reports the epoch Tune's snapshot missed (same value; Optuna keeps the first):
    that one warning is silenced while Tune runs, any other still shows, and nothing is silenced after."""
    import warnings
    from optuna._warnings import optuna_warn
    from orchestrator.search import _quiet_tune
    again = "The reported value is ignored because this `step=1` is already reported."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _quiet_tune():
            optuna_warn(again)
            optuna_warn("another warning")
        optuna_warn(again)
    assert [str(w.message) for w in caught] == ["another warning", again]
