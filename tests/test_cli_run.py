"""`detrdistill run / resume / make-dataset`: exit codes, a NaN trial failing alone, Ctrl-C then resume,
invalid input refused before anything is written."""
from collections import Counter
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_spec
from orchestrator.cli import main
from orchestrator.plan import build_plan
from orchestrator.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def children(uri: str, experiment: str) -> dict:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_nan_trials_fail_alone_with_their_reason(ray_cluster, tiny_data_root, tmp_path, monkeypatch,
                                                 tracking_uri, capsys):
    """A diverging student fails with its NaN; a diverging teacher fails, and its students with it; the
    trial that needs neither finishes, and the exit status is 1."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(tiny_data_root, "nan", student_epochs=1).replace(
        "schedule: {epochs: 1, lr: 2.0e-4", "schedule: {epochs: 1, lr: 1.0e+30")  # the teacher's
    Path("nan.yaml").write_text(spec + "distill: {method: detrdistill}\n"
                                "ablate: {student.schedule.lr: [2.0e-4, 1.0e+30], distill.method: [none, detrdistill]}\n"
                                "table: {rows: [student.schedule.lr], columns: distill.method, metrics: [AP]}\n")
    assert main(["run", "nan.yaml", "--tracking-uri", tracking_uri]) == 1
    out = capsys.readouterr().out
    nan_student = "student.schedule.lr=1e+30 distill.method=none seed=0"
    failure = re.search(re.escape(nan_student) + r": FAILED: (NonFiniteLossError: .*)", out)
    assert failure and "loss became" in failure[1]
    assert re.search(r"teacher: FAILED: NonFiniteLossError: .*loss became", out)
    assert "4 of 5 trial(s) failed:" in out and f"  {nan_student} (" in out

    runs = children(tracking_uri, "nan")
    bad = runs[nan_student]
    assert bad.info.status == "FAILED" and bad.data.tags["detrdistill.status"] == "failed"
    assert bad.data.tags["detrdistill.failure"] == failure[1]
    assert re.search(r"epoch 1\b", failure[1])  # it fails fast, not after training
    for lr in ("0.0002", "1e+30"):
        student = runs[f"student.schedule.lr={lr} distill.method=detrdistill seed=0"]
        assert student.data.tags["detrdistill.failure"].startswith("its teacher (teacher) failed: NonFiniteLossError")
        assert "epoch_time" not in student.data.metrics  # never started
    good = runs["student.schedule.lr=0.0002 distill.method=none seed=0"]
    assert good.data.tags["detrdistill.status"] == "finished" and "AP" in good.data.metrics
    table = (tmp_path / "results" / "nan" / "table.md").read_text()
    assert re.search(r"\| 0\.0002 \| \d+\.\d \| failed \|", table) and "| 1e+30 | failed | failed |" in table


def test_invalid_input_exits_2_before_anything_is_written(ray_cluster, tiny_data_root, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(tiny_spec(tiny_data_root, "bad", teacher=False).replace("epochs: 2", "epochs: 0"))
    Path("big.yaml").write_text(tiny_spec(tiny_data_root, "big", teacher=False) + "resources: {cpus_per_trial: 64}\n")
    before = tree(tmp_path)
    assert main(["run", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    line = next(i for i, text in enumerate(Path("bad.yaml").read_text().splitlines(), 1) if "epochs: 0" in text)
    assert f"bad.yaml:{line}: student.schedule.epochs: expected an integer >= 1, got 0" in err
    assert "nothing was run" in err
    assert main(["run", "big.yaml"]) == 2
    assert "a trial asks for 64 CPU(s)" in capsys.readouterr().err
    for command in (["resume", "never-ran"], ["table", "never-ran"]):
        assert main(command) == 2
        assert "no MLflow database" in capsys.readouterr().err
    assert tree(tmp_path) == before  # no mlflow.db, runs/, results/, mlruns/


def test_ctrl_c_then_resume_runs_only_what_had_not_finished(ray_cluster, tiny_data_root, tmp_path, tracking_uri,
                                                             monkeypatch, capsys):
    """Ctrl-C (SIGINT) once the short trial finished and the long one has a checkpoint; resume finishes the
    long one from that checkpoint in the same MLflow runs and does not touch the short one."""
    monkeypatch.chdir(tmp_path)
    Path("int.yaml").write_text(tiny_spec(tiny_data_root, "inter", teacher=False) +
                                "ablate: {student.schedule.epochs: [1, 3]}\n")
    short, long = build_plan(load_spec("int.yaml"), "runs").nodes.values()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "int.yaml",
                               "--tracking-uri", tracking_uri, "--ray-address", ray_cluster],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    short_done, long_checkpoint = tmp_path / "runs" / short.hash / "result.json", \
        tmp_path / "runs" / long.hash / "checkpoint.pt"
    deadline = time.time() + 300  # generous: on a loaded 2-core machine Ray's start alone can take a minute
    while not (short_done.exists() and long_checkpoint.exists()) and time.time() < deadline:
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.05)
    if not (short_done.exists() and long_checkpoint.exists()):
        driver.kill()
        pytest.fail(f"no finished short trial and long checkpoint after 300 s: {driver.communicate()[0]}")
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, out
    assert f"Resume with:  detrdistill resume inter --tracking-uri {tracking_uri}" in out
    runs = children(tracking_uri, "inter")
    assert runs[long.name].data.tags["detrdistill.status"] == "interrupted"
    assert runs[long.name].info.status == "KILLED"

    assert main(["resume", "inter", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert f"{short.name}: finished earlier in this experiment; not trained again" in out or \
           f"{short.name}: already finished" in out
    after = children(tracking_uri, "inter")
    assert {n: r.info.run_id for n, r in after.items()} == {n: r.info.run_id for n, r in runs.items()}
    assert after[short.name].data.tags["detrdistill.status"] in ("finished", "cached")
    assert after[long.name].data.tags["detrdistill.status"] == "finished"
    client = MlflowClient(tracking_uri)
    assert sorted(m.step for m in client.get_metric_history(after[long.name].info.run_id, "epoch_time")) == [1, 2, 3]
    short_log = (tmp_path / "runs" / short.hash / "log.txt").read_text()
    long_log = (tmp_path / "runs" / long.hash / "log.txt").read_text()
    assert short_log.count(" pid ") == 1  # trained once, never again
    assert "resumes from its checkpoint" in long_log and "resuming after epoch" in long_log
    parent = client.get_run(after[long.name].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"


def test_make_dataset(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["make-dataset", "synthetic", str(out), "--train", "3", "--val", "2", "--seed", "1",
                 "--image-size", "64"]) == 0
    assert "3 train / 2 val synthetic images at 64 px" in capsys.readouterr().out
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert len(train["images"]) == 3 and len(list((out / "val").glob("*.jpg"))) == 2
    assert max(max(i["width"], i["height"]) for i in train["images"]) == 64


def test_make_dataset_max_objects(tmp_path):
    out = tmp_path / "easy"
    assert main(["make-dataset", "synthetic", str(out), "--train", "12", "--val", "1", "--image-size", "64",
                 "--max-objects", "1"]) == 0
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    per_image = Counter(a["image_id"] for a in train["annotations"])
    assert per_image and max(per_image.values()) == 1
    assert main(["make-dataset", "synthetic", str(tmp_path / "big"), "--train", "12", "--val", "1",
                 "--image-size", "64", "--min-size", "0.4"]) == 0
    big = json.loads((tmp_path / "big" / "annotations" / "instances_train.json").read_text())
    small = json.loads((tmp_path / "easy" / "annotations" / "instances_train.json").read_text())
    # boxes cover visible pixels (occlusion, the border), so compare the medians, not the minimum
    assert _median_size(big) > _median_size(small)


def _median_size(coco: dict) -> int:
    sizes = sorted(max(a["bbox"][2:]) for a in coco["annotations"])
    return sizes[len(sizes) // 2]


def test_make_dataset_refuses_bad_flags(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["make-dataset", "synthetic", str(out), "--max-objects", "0", "--image-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "--max-objects: input should be greater than or equal to 1, got 0" in err
    assert "--image-size: input should be greater than or equal to 32, got 16" in err
    assert "--train" not in err and not out.exists()  # named only what is wrong; nothing written


def test_named_imagenet_weights_offline(ray_cluster, tiny_data_root, tmp_path, monkeypatch, tracking_uri, capsys):
    """backbone_weights: imagenet, offline: with an empty cache `validate` warns and `run` refuses before
    anything is written, naming the file expected in the cache (exit 2); pre-seeded, the trial trains from it
    (the frozen stem keeps the file's weights to the end)."""
    import torch
    import torchvision
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DETRDISTILL_OFFLINE", "1")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    Path("w.yaml").write_text(tiny_spec(tiny_data_root, "weights", teacher=False, student_epochs=1))
    args = ["w.yaml", "--set", "student.model.backbone_weights=imagenet"]
    assert main(["validate", *args]) == 0
    assert f"ImageNet weights of resnet18 are not in the local cache (expected {expected})" in capsys.readouterr().err
    assert main(["run", *args, "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(expected) in err and "offline" in err
    assert not Path("runs").exists() and MlflowClient(tracking_uri).get_experiment_by_name("weights") is None

    seeded = torchvision.models.resnet18(weights=None, norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    expected.parent.mkdir(parents=True)
    torch.save(seeded.state_dict(), expected)
    assert main(["validate", *args]) == 0 and "warning" not in capsys.readouterr().err
    assert main(["run", *args, "--tracking-uri", tracking_uri]) == 0
    (trial,) = [p for p in Path("runs").iterdir() if (p / "result.json").is_file()]
    trained = torch.load(trial / "checkpoint.pt", weights_only=False)["model"]
    assert torch.equal(trained["backbone.stages.0.0.0.weight"], seeded.conv1.weight)  # the frozen stem
    assert not torch.equal(trained["backbone.stages.2.0.conv1.weight"], seeded.layer4[0].conv1.weight)  # trained
