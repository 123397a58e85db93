"""Pretrained weights by name. `backbone_weights: imagenet` is torchvision's IMAGENET1K_V1 file of the backbone
(what DETR, Deformable DETR and MMDetection start from), found in torch hub's cache (`$TORCH_HOME/hub/checkpoints`,
where torchvision keeps it too) or downloaded into it.

Offline mode (DETRDISTILL_OFFLINE, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to 1/true/yes) never opens a
connection: weights missing from the cache are then an error naming the file expected there. Plain Python: the
driver resolves weights before any trial trains, and `validate` reports the cache's state, without torch.
"""
import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

OFFLINE_VARIABLES = ("DETRDISTILL_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
IMAGENET_URL = "https://download.pytorch.org/models/"
# torchvision's IMAGENET1K_V1 file of each backbone; its suffix is the start of the file's sha256
IMAGENET_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
}


class WeightsUnavailable(ValueError):
    """Named pretrained weights are neither in the local cache nor downloadable."""


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, TORCH_HOME defaulting to
    $XDG_CACHE_HOME/torch, XDG_CACHE_HOME to ~/.cache."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def cache_path(backbone: str) -> Path:
    """Where torch hub keeps (or would keep) the backbone's ImageNet weights file."""
    return hub_dir() / "checkpoints" / IMAGENET_FILES[backbone]


def imagenet_file(backbone: str) -> Path:
    """The cached weights file of `backbone`, downloaded first when missing and not offline; raises
    WeightsUnavailable naming the expected file when it can be neither found nor downloaded."""
    path = cache_path(backbone)
    if path.is_file():
        return path
    url = IMAGENET_URL + path.name
    if offline():
        why = f"offline: {'/'.join(OFFLINE_VARIABLES)} is set"
    else:
        try:
            _download(url, path)
            return path
        except (OSError, ValueError) as e:  # no network, a proxy's refusal, a corrupt file: the same advice
            why = f"downloading {url} failed: {e}"
    raise WeightsUnavailable(f"ImageNet weights of {backbone} not found: expected {path} ({why}); put torchvision's "
                             f"{path.name} there, or set TORCH_HOME to a cache that holds it")


def _download(url: str, path: Path) -> None:
    """url -> path, checked against the sha256 prefix in the file's name, renamed into place only when whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    expected = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, \
            tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if not digest.hexdigest().startswith(expected):
        os.unlink(out.name)
        raise ValueError(f"the file's sha256 does not start with {expected}")
    os.replace(out.name, path)


def parse_hf(ref: str) -> tuple[str, str]:
    """'hf:<repo id>[@revision]' -> (repo id, revision; 'main' when none is given)."""
    repo, _, revision = ref[len("hf:"):].partition("@")
    return repo, revision or "main"


def hf_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (HF_HUB_CACHE, else $HF_HOME/hub)."""
    home = os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"))
    return Path(os.path.expanduser(os.getenv("HF_HUB_CACHE", os.path.join(home, "hub"))))


def hf_cached(ref: str) -> bool:
    """Whether the checkpoint's snapshot is in the hub cache (looked up without a connection)."""
    repo, revision = parse_hf(ref)
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(repo, revision=revision, cache_dir=hf_cache(), local_files_only=True)
        return True
    except Exception:  # not cached, or huggingface_hub missing (run then names the extra)
        return False


def hf_snapshot(ref: str) -> Path:
    """The local snapshot folder of a transformers checkpoint named 'hf:<repo id>[@revision]' (a
    save_pretrained directory), from the hub cache or downloaded into it when not offline; WeightsUnavailable
    naming the expected cache folder when it can be neither found nor downloaded."""
    repo, revision = parse_hf(ref)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise WeightsUnavailable(f"teacher checkpoint {ref} needs the optional dependencies transformers and timm: "
                                 "pip install 'detrdistill[hf]'") from e
    cache = hf_cache()
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=offline()))
    except Exception as e:  # not cached offline, no network, no such repository or revision
        where = cache / f"models--{repo.replace('/', '--')}"
        why = "offline" if offline() else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise WeightsUnavailable(f"teacher checkpoint {ref} not found: expected its snapshot under {where} "
                                 f"(revision {revision}; {why})") from None
