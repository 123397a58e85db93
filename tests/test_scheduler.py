"""The scheduler on a real local Ray with real MLflow (SQLite): a whole experiment, teacher reuse across
experiments, and a worker killed mid-training that resumes in the same MLflow run."""
import os
import re
import signal
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import tiny_spec
from orchestrator import tables
from orchestrator.cli import main
from orchestrator.plan import PID, build_plan, read_result
from orchestrator.spec import load_spec
from orchestrator.tracking import provenance

DISTIL = "distill: {method: detrdistill}\nablate: {distill.method: [none, detrdistill]}\n" \
         "table: {rows: [distill.method], metrics: [AP, AP50], baseline: {distill.method: none}}\n"


def runs_by_name(uri: str, experiment: str) -> dict:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.info.run_name: r for r in runs}


def steps(uri: str, run, key: str = "epoch_time") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, key))


def test_experiment_end_to_end_and_a_teacher_reused_by_the_next(ray_cluster, tiny_data_root, tmp_path,
                                                                monkeypatch, tracking_uri, capsys):
    monkeypatch.chdir(tmp_path)
    drawn = DISTIL.replace("baseline: {distill.method: none}}", "baseline: {distill.method: none}, predictions: 2}")
    Path("a.yaml").write_text(tiny_spec(tiny_data_root, "exp-a", extra=drawn))
    assert main(["run", "a.yaml", "--tracking-uri", tracking_uri]) == 0
    sheets = sorted(Path("results/exp-a/predictions").iterdir())
    assert [p.name for p in sheets] == [f"{p.stem}.png" for p in sorted((tiny_data_root / "val").iterdir())[:2]]
    from PIL import Image
    sheet = Image.open(sheets[0])  # teacher, plain and distilled student side by side, each enlarged to >= 256 px
    assert sheet.height >= 256 + 14 and sheet.width >= 3 * 256 + 8
    out = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri {tracking_uri}" in out and "| distill.method | AP | AP50 |" in out

    plan = build_plan(load_spec("a.yaml"), "runs")
    runs = runs_by_name(tracking_uri, "exp-a")
    parent = runs.pop("exp-a")
    assert parent.info.status == "FINISHED" and parent.data.tags["detrdistill.kind"] == "experiment"
    client = MlflowClient(tracking_uri)
    assert {f.path for f in client.list_artifacts(parent.info.run_id)} == {
        "spec.yaml", "table.md", "table.csv", "table.tex", "plot.png", "curves.png", "predictions"}
    assert client.get_experiment_by_name("exp-a").tags["mlflow.experimentKind"] == "custom_model_development"
    assert set(runs) == {"teacher", "distill.method=none seed=0", "distill.method=detrdistill seed=0"}
    for name, run in runs.items():
        tags = run.data.tags
        node = plan.nodes[tags["detrdistill.trial_hash"]]
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["detrdistill.status"] == "finished"
        assert tags["detrdistill.kind"] == node.kind and node.name == name
        assert run.data.params["model.backbone"] == "resnet18" and run.data.params["schedule.batch_size"] == "4"
        assert steps(tracking_uri, run) == list(range(1, node.config.schedule.epochs + 1))  # every epoch, once
        assert {"train/loss", "lr", "AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(run.data.metrics)
        assert {f.path for f in client.list_artifacts(run.info.run_id)} == {
            "checkpoint.pt", "result.json", "trial.json", "log.txt"}
        assert read_result(plan.workdir(node.hash))["metrics"]["AP"] == run.data.metrics["AP"]
        if node.kind == "trial":
            method = node.config.distill.method
            assert tags["axis.distill.method"] == method and tags["axis.seed"] == "0"
    assert "train/kd_logits" in runs["distill.method=detrdistill seed=0"].data.metrics
    code = provenance()  # every run records the code that wrote it
    assert re.fullmatch(r"[0-9a-f]{40}", code["detrdistill.git_commit"]) and code["detrdistill.git_dirty"] in (
        "true", "false")
    assert code["detrdistill.method_version"] == "1" and {f"detrdistill.version.{name}" for name in (
        "torch", "ray", "mlflow", "optuna")} <= set(code)
    for run in (parent, *runs.values()):
        assert {key: run.data.tags.get(key) for key in code} == code, run.info.run_name

    # the files under results/ are the table, and `detrdistill table` prints them again from MLflow
    for fmt, name in tables.FORMATS.items():
        assert main(["table", "exp-a", "--format", fmt, "--tracking-uri", tracking_uri]) == 0
        assert capsys.readouterr().out == (tmp_path / "results" / "exp-a" / name).read_text()

    # another experiment with the same teacher: the teacher is not trained again
    teacher = next(n for n in plan.nodes.values() if n.kind == "teacher")
    log_before = (plan.workdir(teacher.hash) / "log.txt").read_text()
    Path("b.yaml").write_text(tiny_spec(tiny_data_root, "exp-b", student_epochs=1) + "distill: {method: detrdistill}\n")
    assert main(["run", "b.yaml", "--tracking-uri", tracking_uri]) == 0
    assert "teacher: already finished" in capsys.readouterr().out
    runs_b = runs_by_name(tracking_uri, "exp-b")
    assert runs_b["teacher"].data.tags["detrdistill.status"] == "cached"
    assert steps(tracking_uri, runs_b["teacher"]) == [1]  # its history, copied from the store
    assert runs_b["seed=0"].data.tags["detrdistill.status"] == "finished"
    assert (plan.workdir(teacher.hash) / "log.txt").read_text() == log_before


def test_a_trial_finished_under_another_method_version_is_trained_again(ray_cluster, tiny_data_root, tmp_path,
                                                                        monkeypatch, tracking_uri, capsys):
    """The same spec run again reuses its finished trial; after a bump of trainers.version.METHOD_VERSION the
    trial has another hash and trains again in a folder of its own, under a new parent run whose table holds
    only the new trial."""
    from trainers import version
    monkeypatch.chdir(tmp_path)
    Path("v.yaml").write_text(tiny_spec(tiny_data_root, "versioned", teacher=False, student_epochs=1))
    assert main(["run", "v.yaml", "--tracking-uri", tracking_uri]) == 0
    old = next(iter(build_plan(load_spec("v.yaml"), "runs").nodes))
    log = (tmp_path / "runs" / old / "log.txt").read_text()
    assert main(["run", "v.yaml", "--tracking-uri", tracking_uri]) == 0
    assert "seed=0: finished earlier in this experiment; not trained again" in capsys.readouterr().out
    assert (tmp_path / "runs" / old / "log.txt").read_text() == log

    monkeypatch.setattr(version, "METHOD_VERSION", 2)
    new = next(iter(build_plan(load_spec("v.yaml"), "runs").nodes))
    assert new != old
    assert main(["run", "v.yaml", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert "seed=0: finished, epoch 1/1" in out and "not trained again" not in out
    assert read_result(tmp_path / "runs" / new)["hash"] == new
    assert (tmp_path / "runs" / new / "log.txt").read_text().count(" starts\n") == 1
    assert (tmp_path / "runs" / old / "log.txt").read_text() == log  # the old trial is left as it was

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("versioned").experiment_id
    parents = client.search_runs([experiment], "tags.`detrdistill.kind` = 'experiment'",
                                 order_by=["attributes.start_time DESC"])
    assert len(parents) == 2
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert [(c.data.tags["detrdistill.trial_hash"], c.data.tags["detrdistill.status"],
             c.data.tags["detrdistill.method_version"]) for c in children] == [(new, "finished", "2")]


def test_a_killed_worker_is_retried_and_resumes_in_the_same_run(ray_cluster, tiny_data_root, tmp_path,
                                                                monkeypatch, tracking_uri, capsys):
    monkeypatch.chdir(tmp_path)
    Path("k.yaml").write_text(tiny_spec(tiny_data_root, "killed", teacher=False, student_epochs=3))
    node = next(iter(build_plan(load_spec("k.yaml"), "runs").nodes.values()))
    workdir = tmp_path / "runs" / node.hash
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 120
        while not (workdir / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.02)
        pid = int((workdir / PID).read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    assert main(["run", "k.yaml", "--tracking-uri", tracking_uri]) == 0
    watcher.join()
    out = capsys.readouterr().out
    assert killed and re.search(r"seed=0: its worker died; retry 1/1 resumes from its last checkpoint", out)

    runs = runs_by_name(tracking_uri, "killed")
    assert set(runs) == {"killed", "seed=0"}  # one child run, continued by the retry
    run = runs["seed=0"]
    assert run.data.tags["detrdistill.status"] == "finished" and run.data.tags["detrdistill.attempts"] == "2"
    assert steps(tracking_uri, run) == [1, 2, 3]
    log = (workdir / "log.txt").read_text()
    assert log.count(" starts\n") == 1 and log.count("resumes from its checkpoint") == 1
    assert "resuming after epoch 1" in log  # the second attempt did not train epoch 1 again
    assert log.count("epoch 1/3 step 4/4") == 1
    assert int((workdir / PID).read_text()) != killed[0]


def test_progress_messages_do_not_let_ray_oversubscribe_cpus(ray_cluster):
    """A task blocked in ray.get lends its CPU to another task; `send` must not block, or more one-CPU trials
    run at once than there are CPUs (3 on 2 CPUs with ray.util.queue's Queue.put). Messages keep their order."""
    import ray
    from orchestrator.scheduler import Mailbox, send

    cpus = int(ray.cluster_resources()["CPU"])
    mailbox = Mailbox.remote()

    @ray.remote(num_cpus=1)
    def chatty(i, mailbox):
        started = time.time()
        for k in range(15):
            send(mailbox, (i, k))
            time.sleep(0.05)
        return started, time.time()

    spans = ray.get([chatty.remote(i, mailbox) for i in range(cpus + 2)])
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most <= cpus
    messages, deadline = [], time.time() + 10
    while len(messages) < 15 * (cpus + 2) and time.time() < deadline:  # sends are not awaited: may trail
        messages += ray.get(mailbox.take.remote())
        time.sleep(0.05)
    assert len(messages) == 15 * (cpus + 2)
    for i in range(cpus + 2):  # in order per sender
        assert [k for j, k in messages if j == i] == list(range(15))


def test_ctrl_c_after_the_last_trial_finished_still_ends_with_the_table(ray_cluster, tiny_data_root, tmp_path,
                                                                        monkeypatch, tracking_uri, capsys):
    """A Ctrl-C that lands in the loop step where the last trial finishes has nothing left to interrupt: the
    run must end normally (exit 0, the table written), not as interrupted with no table."""
    from orchestrator import scheduler
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(tiny_spec(tiny_data_root, "late-ctrl-c", teacher=False, student_epochs=1))
    task_done = scheduler._Driver._task_done
    sent = []

    def task_done_then_ctrl_c(self, ref):
        task_done(self, ref)
        if all(s.state in scheduler.DONE for s in self.states.values()):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs here, before the loop reads its flag
            sent.append(True)

    monkeypatch.setattr(scheduler._Driver, "_task_done", task_done_then_ctrl_c)
    assert main(["run", "c.yaml", "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert sent and "Interrupted" not in out
    table = (tmp_path / "results" / "late-ctrl-c" / "table.md").read_text()
    assert "AP" in table and table.strip() in out
    assert runs_by_name(tracking_uri, "late-ctrl-c")["late-ctrl-c"].info.status == "FINISHED"


def test_ctrl_c_in_the_trial_loop_raises_a_flag_not_an_exception():
    """The first SIGINT must not interrupt whatever the driver is doing (an MLflow write half done leaves
    SQLite locked, and the interrupted trials could then not be marked); the second stops at once."""
    from orchestrator.scheduler import _ctrl_c_deferred
    before = signal.getsignal(signal.SIGINT)
    with _ctrl_c_deferred() as ctrl_c:
        assert not ctrl_c.pressed
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs at the next bytecode boundary of the main thread
            if ctrl_c.pressed:
                break
            time.sleep(0.01)
        assert ctrl_c.pressed
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
            raise AssertionError("a second Ctrl-C did not raise")
        except KeyboardInterrupt:
            pass
    assert signal.getsignal(signal.SIGINT) is before


def test_a_gpu_trial_gets_its_share_of_the_node_cpus_and_a_cpu_trial_one():
    from orchestrator.scheduler import trial_cpus
    one_gpu_host = [{"CPU": 16.0, "GPU": 1.0}]
    assert trial_cpus(one_gpu_host, 1.0) == 16
    assert trial_cpus(one_gpu_host, 0.5) == 8  # two trials share the GPU and its CPUs
    assert trial_cpus([{"CPU": 64.0, "GPU": 8.0}, {"CPU": 96.0}], 1.0) == 8  # CPU-only nodes run no GPU trial
    assert trial_cpus([{"CPU": 64.0, "GPU": 8.0}, {"CPU": 24.0, "GPU": 2.0}], 2.0) == 24  # the best-provisioned
    assert trial_cpus(one_gpu_host, 0.0) == 1 and trial_cpus([{"CPU": 2.0}], 0.0) == 1
    assert trial_cpus([{"CPU": 2.0, "GPU": 4.0}], 1.0) == 1  # at least one


RESOLVE = """
import json, sys, ray
from orchestrator.scheduler import resolve_resources
from orchestrator.spec import parse_spec
ray.init(num_cpus=12, num_gpus=2, include_dashboard=False)  # logical GPUs: Ray schedules by the numbers
out = {}
for name, extra in [("default", ""), ("half", "resources: {gpus_per_trial: 0.5}\\n"),
                    ("given", "resources: {cpus_per_trial: 3}\\n")]:
    res = resolve_resources(parse_spec(sys.argv[1] + extra)).resources
    out[name] = [res.gpus_per_trial, res.cpus_per_trial]
print(json.dumps(out))
"""


def test_default_resources_resolve_on_a_cluster_with_gpus(tiny_data_root, tmp_path):
    """On a real Ray (its own process) declaring 12 CPUs and 2 GPUs: a trial that asks for nothing gets one
    GPU and 6 CPUs, half a GPU 3 CPUs; CPUs given in the spec are kept."""
    import json
    import subprocess
    import sys
    spec = tiny_spec(tiny_data_root, "res", teacher=False)
    proc = subprocess.run([sys.executable, "-c", RESOLVE, spec], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"default": [1.0, 6], "half": [0.5, 3], "given": [1.0, 3]}


def test_default_resources_on_this_cpu_cluster_are_one_cpu_no_gpu(ray_cluster, tiny_data_root):
    from orchestrator.scheduler import resolve_resources
    from orchestrator.spec import parse_spec
    resolved = resolve_resources(parse_spec(tiny_spec(tiny_data_root, "res", teacher=False))).resources
    assert (resolved.gpus_per_trial, resolved.cpus_per_trial) == (0.0, 1)
