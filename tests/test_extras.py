"""Optional dependencies: a transformers teacher without the `hf` extra is refused with the extra's name."""
import json
import sys

import pytest

from trainers.models import from_transformers


def _checkpoint_dir(tmp_path, timm: bool):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deformable_detr", "use_timm_backbone": timm}))
    return tmp_path


@pytest.mark.parametrize("missing, timm", [("transformers", False), ("transformers", True), ("timm", True)])
def test_a_missing_extra_is_named(tmp_path, monkeypatch, missing, timm):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    with pytest.raises(ImportError, match=rf"{missing} is missing.*detrdistill\[hf\]"):
        from_transformers(_checkpoint_dir(tmp_path, timm))


def test_timm_is_not_needed_without_a_timm_backbone(tmp_path, monkeypatch):
    """A torchvision-style backbone loads without timm: the error is then about the empty folder, not timm."""
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(OSError):
        from_transformers(_checkpoint_dir(tmp_path, timm=False))
