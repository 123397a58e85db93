"""Teachers named hf:<repo id>[@revision]: resolved from a pre-seeded hub cache offline (no connection is opened),
refused naming the expected cache folder when absent, and their classes put in the dataset's order by name."""
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from test_parity_deformable import hf_model  # noqa: E402
from trainers.checkpoint import align_classes, load_detector  # noqa: E402
from trainers.pretrained import WeightsUnavailable, hf_cached, hf_snapshot  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NAMES = ["circle", "square", "triangle", "star", "cross"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache, offline; `seed()` writes a tiny Deformable DETR snapshot of org/tiny into it, as
    huggingface_hub lays one out (snapshots/<commit>/, refs/main)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--org--tiny"

    def seed(names=NAMES, **config):
        model = hf_model(labels=len(names), **config)
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}
        shutil.rmtree(repo, ignore_errors=True)
        model.save_pretrained(repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        return model
    return repo, seed


def test_an_empty_cache_offline_names_the_expected_folder(hub):
    repo, _ = hub
    assert not hf_cached("hf:org/tiny")
    with pytest.raises(WeightsUnavailable, match=f"expected its snapshot under {repo} .*offline"):
        hf_snapshot("hf:org/tiny")


def test_a_seeded_snapshot_is_found_by_branch_and_by_commit(hub):
    repo, seed = hub
    reference = seed()
    for ref in ("hf:org/tiny", f"hf:org/tiny@{COMMIT}"):
        assert hf_cached(ref) and hf_snapshot(ref) == repo / "snapshots" / COMMIT
    with pytest.raises(WeightsUnavailable, match="revision v2"):
        hf_snapshot("hf:org/tiny@v2")
    detector, meta = load_detector(hf_snapshot("hf:org/tiny"))
    assert meta["label_names"] == NAMES
    images, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        ref = reference(pixel_values=images, pixel_mask=(~mask).long())
        out = detector(images, mask)
    assert (out.logits[-1] - ref.logits).abs().max() < 1e-4  # the snapshot's weights, converted


def test_classes_follow_the_dataset_by_name(hub):
    _, seed = hub
    seed()
    teacher, meta = load_detector(hf_snapshot("hf:org/tiny"))
    images, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        before = teacher(images, mask).logits
    dataset = ["star", "circle", "ring", "square"]  # another order; "ring" is the teacher's "cross"
    aligned = align_classes(teacher, meta["label_names"], dataset, {"ring": "cross"}, "trial t")
    with torch.no_grad():
        after = aligned(images, mask).logits
    assert aligned.num_classes == 4 and after.shape[-1] == 4
    for j, name in enumerate(["star", "circle", "cross", "square"]):
        torch.testing.assert_close(after[..., j], before[..., NAMES.index(name)], rtol=0, atol=1e-5)


def test_a_category_the_teacher_lacks_is_refused_with_its_name(hub):
    _, seed = hub
    seed()
    teacher, meta = load_detector(hf_snapshot("hf:org/tiny"))
    with pytest.raises(ValueError, match=r"trial t: the teacher has no class for 1 .*'ring'.*teacher.label_map"):
        align_classes(teacher, meta["label_names"], ["circle", "ring"], {}, "trial t")


def test_a_student_distils_from_a_hub_teacher(hub, tiny_data_root, tmp_path):
    """A trial whose teacher is hf:org/tiny (the synthetic task's ten classes, listed in reverse, one under
    another name mapped by teacher.label_map) trains: the teacher's classes are put in the data's order."""
    from conftest import tiny_trial
    from trainers.config import DistillConfig, TeacherConfig
    from trainers.data.synthetic import CLASSES
    from trainers.engine import run_trial
    _, seed = hub
    names = [("disc" if n == "circle" else n) for n in reversed(CLASSES)]
    seed(names, levels=2)  # as many feature levels as the tiny student
    config = tiny_trial(tiny_data_root, "deformable_detr", epochs=1, distill=DistillConfig(method="detrdistill"),
                        teacher=TeacherConfig(checkpoint=hf_snapshot("hf:org/tiny"), label_map={"circle": "disc"}))
    metrics = run_trial(config, tmp_path / "trial", log=lambda s: None)
    assert metrics["epoch"] == 1 and metrics["train/kd_logits"] > 0 and "AP" in metrics
    unmapped = config.model_copy(update={"teacher": config.teacher.model_copy(update={"label_map": {}})})
    with pytest.raises(ValueError, match="no class for 1 of the dataset's categories: 'circle'"):
        run_trial(unmapped, tmp_path / "unmapped", log=lambda s: None)
