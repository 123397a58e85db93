"""`detrdistill predict` and `eval`: a checkpoint's detections drawn on images, its COCO metrics on a spec's
validation split equal to what its trial measured."""
import re

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_spec, tiny_trial
from orchestrator.cli import main
from trainers.engine import run_trial
from trainers.predict import detect, load, predict


@pytest.fixture(scope="module")
def trained(tiny_data_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("predict")
    metrics = run_trial(tiny_trial(tiny_data_root, "deformable_detr", epochs=1), workdir, log=lambda s: None)
    return workdir / "checkpoint.pt", metrics


def test_eval_gives_the_trials_own_metrics(trained, tiny_data_root, tmp_path, monkeypatch, capsys):
    checkpoint, metrics = trained
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(tiny_spec(tiny_data_root, "e", teacher=False))
    assert main(["eval", str(checkpoint), "spec.yaml"]) == 0
    printed = dict(re.findall(r"(AP\w*) (-?[\d.]+)", capsys.readouterr().out))
    assert set(printed) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for k in printed:
        assert float(printed[k]) == pytest.approx(100 * metrics[k], abs=0.051), k  # printed to 0.1
    assert main(["eval", str(tmp_path / "nope.pt"), "spec.yaml"]) == 2


def test_predict_draws_the_detections(trained, tiny_data_root, tmp_path, capsys):
    checkpoint, _ = trained
    images = sorted((tiny_data_root / "val").glob("*"))[:2]
    model, names, augment = load(checkpoint)
    assert names[:2] == ["circle", "square"]  # the trial's category names, from the checkpoint
    image = Image.open(images[0]).convert("RGB")
    found = detect(model, image, augment, threshold=0.0)
    assert len(found) == 100 and [s for s, _, _ in found] == sorted((s for s, _, _ in found), reverse=True)
    assert all(0 <= x0 <= x1 <= image.width + 1e-3 and 0 <= y0 <= y1 <= image.height + 1e-3
               for _, _, (x0, y0, x1, y1) in found)
    assert main(["predict", str(checkpoint), *map(str, images), "--out", str(tmp_path / "out"),
                 "--threshold", "0"]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in written] == [f"{p.stem}.png" for p in images]
    drawn = Image.open(written[0])
    assert drawn.size == image.size and not np.array_equal(np.asarray(drawn), np.asarray(image))
    titled = predict(checkpoint, images[:1], tmp_path / "titled", threshold=2.0, title="student")[0]
    titled = Image.open(titled)  # a title bar above the image, no box (nothing scores above 2)
    assert titled.width == image.width and titled.height > image.height
    assert np.array_equal(np.asarray(titled)[-image.height:], np.asarray(image))
    assert main(["predict", str(checkpoint), "missing.png", "--out", str(tmp_path)]) == 2
