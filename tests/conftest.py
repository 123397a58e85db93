"""Shared fixtures: a tiny synthetic COCO-format dataset and tiny trial configs (CPU, seconds)."""
import os

import pytest
import torch

from trainers.config import (AugmentConfig, DataConfig, DistillConfig, ModelConfig, RuntimeConfig, ScheduleConfig,
                                        TeacherConfig, TrialConfig)
from trainers.data.synthetic import make_synthetic

TINY_SIZE = 96

# a developer's cluster (detrdistill's defaults for --ray-address and --tracking-uri) is not the tests' to use
for _var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and far faster than two when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    """16 train / 8 val synthetic images at 96 px, generated once per test session."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, train=16, val=8, seed=0, image_size=TINY_SIZE)
    return root


def tiny_trial(root, family="conditional_detr", epochs=2, **overrides) -> TrialConfig:
    """A trial small enough for a unit test: resnet18, d=64, 1+1 layers, 10 queries, 96 px, batch 4."""
    data = DataConfig(format="coco", root=root, train="annotations/instances_train.json",
                      val="annotations/instances_val.json",
                      augment=AugmentConfig(scales=[80, 96], max_size=112, crop=True, crop_resize=[64, 80],
                                            crop_min=48, crop_max=80, test_size=TINY_SIZE))
    model = dict(family=family, backbone="resnet18", decoder_layers=1, num_queries=10, hidden_dim=64,
                 num_heads=4, ffn_dim=128)
    if family != "adamixer":
        model["encoder_layers"] = 1
    if family == "deformable_detr":
        model["num_feature_levels"] = 2
    cfg = dict(name=f"tiny-{family}", data=data, model=ModelConfig(**model),
               schedule=ScheduleConfig(epochs=epochs, lr=2e-4, batch_size=4, lr_drop_epochs=[1], warmup_iters=2),
               runtime=RuntimeConfig(threads=1, data_workers=0, device=overrides.pop("device", "auto")))
    cfg.update(overrides)
    return TrialConfig(**cfg)


def tiny_distill_trial(root, tmp_path_factory, method="detrdistill") -> TrialConfig:
    """A one-epoch tiny distillation trial; its teacher (a one-epoch tiny trial) is trained once per test
    session, in <basetemp>/kd-teacher."""
    from trainers.engine import run_trial
    teacher_dir = tmp_path_factory.getbasetemp() / "kd-teacher"
    if not (teacher_dir / "checkpoint.pt").exists():
        run_trial(tiny_trial(root, epochs=1), teacher_dir, log=lambda s: None)
    return tiny_trial(root, epochs=1, distill=DistillConfig(method=method),
                      teacher=TeacherConfig(model=tiny_trial(root).model, checkpoint=teacher_dir / "checkpoint.pt"))


# ---- orchestration tests (test_plan, test_tables, test_scheduler, test_cli_run) ---------------------------

@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory):
    """An empty MLflow SQLite database, made once: creating one runs MLflow's migrations (seconds)."""
    from mlflow.tracking import MlflowClient
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, mlflow_db_template):
    """A fresh MLflow database of this test's own (a copy of the template)."""
    import shutil
    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray per test module (starting one takes seconds); the scheduler uses it as it is."""
    import ray
    from orchestrator.scheduler import start_ray
    start_ray()
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


TINY_MODEL = ("{family: conditional_detr, backbone: resnet18, encoder_layers: 1, decoder_layers: 1, "
              "num_queries: 10, hidden_dim: 64, num_heads: 4, ffn_dim: 128}")


def tiny_spec(root, name, teacher=True, student_epochs=2, extra="") -> str:
    """The YAML of a tiny experiment on the tiny dataset: students (and a teacher) of TINY_MODEL's size."""
    text = (f"name: {name}\n"
            f"runtime: {{data_workers: 0}}\n"
            f"data: {{format: coco, root: {root},\n"
            f"       augment: {{scales: [80, 96], max_size: 96, crop: false, test_size: {TINY_SIZE}}}}}\n"
            f"student:\n  model: {TINY_MODEL}\n"
            f"  schedule: {{epochs: {student_epochs}, lr: 2.0e-4, batch_size: 4, lr_drop_epochs: [10]}}\n")
    if teacher:
        text += (f"teacher:\n  model: {TINY_MODEL}\n"
                 f"  schedule: {{epochs: 1, lr: 2.0e-4, batch_size: 4}}\n")
    return text + extra
