"""The plan: teachers deduplicated and first, the trial store, teachers given as checkpoints, spec round trip."""
from pathlib import Path

from conftest import TINY_MODEL, tiny_spec
from orchestrator.plan import CHECKPOINT, DOWNLOADS, build_plan, spec_text, write_result
from orchestrator.spec import expand_trials, load_spec, parse_spec

GRID = ("distill: {method: detrdistill}\n"
        "ablate:\n  distill.method: [none, detrdistill]\n  distill.logits.weight: [0.5, 1.0]\n"
        "seeds: [0, 1]\nresources: {cpus_per_trial: 2}\n")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_teachers_are_deduplicated_and_come_first(tiny_data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(tmp_path, "grid", tiny_spec(tiny_data_root, "grid", extra=GRID)))
    plan = build_plan(spec, "store")
    assert plan.store == tmp_path / "store"
    nodes = list(plan.nodes.values())
    teachers = [n for n in nodes if n.kind == "teacher"]
    assert len(teachers) == 1 and nodes[0] is teachers[0]  # one teacher for 4 distilling trials, first
    teacher = teachers[0]
    students = nodes[1:]
    # 8 planned trials: without distillation the logits weight is ignored, so those 4 are 2 trials (per seed)
    assert len(expand_trials(spec)) == 8 and len(students) == 6
    plain = [n for n in students if n.config.distill.method == "none"]
    assert len(plain) == 2 and all(len(n.cells) == 2 for n in plain)
    assert {c["distill.logits.weight"] for c in plain[0].cells} == {0.5, 1.0}
    for node in students:
        assert node.needs == (teacher.hash if node.config.distill.method == "detrdistill" else None)
        if node.needs:  # the content-addressed store says where the teacher's weights will be
            assert node.config.teacher.checkpoint == tmp_path / "store" / teacher.hash / CHECKPOINT
        assert node.config.data.root.is_absolute() and node.config.runtime.threads == 2
    assert plan.students_of(teacher.hash) == [n for n in students if n.needs]

    # DAG order: only what needs no teacher is ready at first
    assert {n.hash for n in plan.ready(done=set())} == {teacher.hash, *(n.hash for n in plain)}
    ready = plan.ready(done={teacher.hash}, started={n.hash for n in plain})
    assert {n.hash for n in ready} == {n.hash for n in students if n.needs}


def test_a_finished_teacher_is_reused_by_another_experiment(tiny_data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = build_plan(load_spec(write(tmp_path, "a", tiny_spec(tiny_data_root, "a", extra=GRID))), "store")
    second_text = tiny_spec(tiny_data_root, "b", student_epochs=3) + "distill: {method: detrdistill}\n"
    second = build_plan(load_spec(write(tmp_path, "b", second_text)), "store")
    teacher = next(n for n in first.nodes.values() if n.kind == "teacher")
    assert next(n for n in second.nodes.values() if n.kind == "teacher").hash == teacher.hash
    assert second.finished() == set()
    write_result(first.workdir(teacher.hash), {"metrics": {"AP": 0.1}, "history": []})  # as the trial does
    assert second.finished() == {teacher.hash}
    student = next(n for n in second.nodes.values() if n.kind == "trial")
    assert second.ready(done=second.finished()) == [student]  # the student needs no teacher training


def test_a_teacher_given_as_a_checkpoint_is_not_trained(tiny_data_root, tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.pt").write_bytes(b"weights")
    (tmp_path / "hf_teacher").mkdir()
    (tmp_path / "hf_teacher" / "config.json").write_text("{}")

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("teachers"))
    client.log_artifact(run.info.run_id, str(tmp_path / "teacher.pt"), "model")

    for given in ("teacher.pt", "hf_teacher", f"runs:/{run.info.run_id}/model/teacher.pt"):
        text = tiny_spec(tiny_data_root, "given", teacher=False) + (
            f"teacher:\n  model: {TINY_MODEL}\n  checkpoint: {given}\n"
            "distill: {method: detrdistill}\nablate: {distill.method: [none, detrdistill]}\n")
        plan = build_plan(load_spec(write(tmp_path, "given", text)), "store", tracking_uri)
        assert [n.kind for n in plan.nodes.values()] == ["trial", "trial"]
        assert all(n.needs is None for n in plan.nodes.values())
        checkpoint = plan.nodes[list(plan.nodes)[1]].config.teacher.checkpoint
        if given.startswith("runs:/"):  # downloaded into the store
            assert checkpoint == tmp_path / "store" / DOWNLOADS / run.info.run_id / "model" / "teacher.pt"
            assert checkpoint.read_bytes() == b"weights"
        else:
            assert checkpoint == tmp_path / given


def test_the_stored_spec_reproduces_the_same_trials(tiny_data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = ["student.schedule.epochs=1", "ablate.distill.logits.weight=[0.25, 2.0]", "seeds=[3]"]
    spec = load_spec(write(tmp_path, "grid", tiny_spec(tiny_data_root, "grid", extra=GRID)), overrides)
    again = parse_spec(spec_text(spec), file="stored")
    assert spec_text(again) == spec_text(spec)
    assert [t.hash for t in expand_trials(again)] == [t.hash for t in expand_trials(spec)]
    assert {t.config.schedule.epochs for t in expand_trials(again)} == {1}
