"""MLflow's UI opens an experiment of ours on its runs table, not on the GenAI onboarding page: checked in a real
browser (headless Chromium) against a real `mlflow server`, on the DOM the page renders."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.tracking import Tracker, runs_page

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("no chromium here (apt-get install chromium)")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(tmp_path):
    """A parent run with two child runs in a SQLite store, logged as the scheduler logs them, served by
    `mlflow server` on a free loopback port."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("ui-check", uri)
    parent = tracker.parent_run("h", "name: ui-check\n")
    for name, ap in (("distill.method=none seed=0", 0.21), ("distill.method=detrdistill seed=0", 0.25)):
        run, _ = tracker.trial_run(parent, name, name, "trial", {"distill": {"method": name}}, {})
        tracker.log_epoch(run, {"epoch": 1, "AP": ap})
        tracker.set_status(run, "finished")
    tracker.finish_parent(parent, status="FINISHED")
    port = _free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start")
                time.sleep(0.5)
        yield base, tracker.experiment_id
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _dom(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (virtual time: the app's requests and renders complete)."""
    out = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    return out.stdout


def test_the_ui_opens_on_the_runs_table(ui, chromium, tmp_path):
    """The page `detrdistill run` points at: the runs table (the parent run, its two children counted among the
    matching runs; MLflow lists children under their parent's expander), no GenAI onboarding."""
    base, experiment_id = ui
    dom = _dom(chromium, f"{base}/{runs_page(experiment_id)}", tmp_path / "profile")
    assert ">Runs<" in dom and ">ui-check<" in dom, dom[-2000:]
    assert "<strong>3</strong> matching runs" in dom  # the parent and its two children
    assert "first trace" not in dom and "Send your" not in dom
