"""The cluster set-up, on this machine: a Ray head started with `ray start --head` and an MLflow tracking server
(`mlflow server`), each its own process as in docker/compose.yaml, and the driver connecting to both; plus
the clear, quick errors when either is not there or Ray refuses the driver."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_spec
from orchestrator.cli import main
from orchestrator.plan import build_plan
from orchestrator.spec import load_spec

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env(**env: str) -> dict:
    """This environment as a user's shell has it: without the RAY_AUTH_MODE that an in-process Ray started by
    another test module sets in this process."""
    return {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"PYTHONUNBUFFERED": "1"} | env


def start(command: list[str], log: Path, ready, what: str, timeout: float = 180) -> subprocess.Popen:
    """Start a server in its own process group and wait until ready() is true."""
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=user_env())
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            pytest.fail(f"{what} did not start: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """The whole process group at once (the Ray head's GCS, raylet and workers; MLflow's uvicorn workers): a
    Ray head takes 35 s to stop on SIGTERM, and nothing of a test's servers needs keeping."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` with a SQLite backend and proxied artifacts, on a free port -> (its URI, artifact dir)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                  "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"], root / "server.log", ready, "mlflow server")
    yield uri, root / "artifacts"
    stop(proc)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` (Ray's default authentication: a token, for a cluster on this machine)."""
    root = tmp_path_factory.mktemp("ray-head")
    port = free_port()
    log = root / "head.log"
    proc = start([str(BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2",
                  "--include-dashboard", "false", "--disable-usage-stats", "--block"], log,
                 lambda: "Ray runtime started" in log.read_text(), "ray start --head")
    yield f"127.0.0.1:{port}"
    stop(proc)
    # killed, the head leaves its address as this machine's latest `ray start` cluster for Ray's tools to find
    latest = Path("/tmp/ray/ray_current_cluster")
    if latest.is_file() and latest.read_text().strip().endswith(f":{port}"):
        latest.unlink()


def driver(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`detrdistill ARGS` in a fresh process (a driver of its own, as on a cluster's login node)."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          env=user_env(**env), capture_output=True, text=True, timeout=600)


def test_an_experiment_on_a_ray_head_tracked_by_an_mlflow_server(ray_head, mlflow_server, tiny_data_root,
                                                                 tmp_path):
    uri, artifacts = mlflow_server
    (tmp_path / "c.yaml").write_text(tiny_spec(tiny_data_root, "on-cluster", student_epochs=1,
                                               extra="distill: {method: detrdistill}\n"))
    place = ["--ray-address", ray_head, "--tracking-uri", uri, "--store", str(tmp_path / "store")]
    done = driver(["run", "c.yaml", *place], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"MLflow UI on these runs:  {re.escape(uri)}/#/experiments/\d+\?workflowType=machine_learning",
                     done.stdout) and "View run" not in done.stdout
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local database

    plan = build_plan(load_spec(tmp_path / "c.yaml"), tmp_path / "store")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("on-cluster")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"on-cluster", "teacher", "seed=0"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert "train/kd_logits" in runs["seed=0"].data.metrics and "AP" in runs["seed=0"].data.metrics
    for node in plan.nodes.values():  # each trial's checkpoint went through the server into its artifact store
        run = runs[node.name]
        assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"checkpoint.pt", "result.json"}
        stored = list(artifacts.rglob(f"{run.info.run_id}/artifacts/checkpoint.pt"))
        assert len(stored) == 1 and stored[0].stat().st_size == (plan.workdir(node.hash) / "checkpoint.pt").stat().st_size

    table = driver(["table", "on-cluster"], tmp_path, MLFLOW_TRACKING_URI=uri)  # MLflow's variable as default
    assert table.returncode == 0 and table.stdout == (tmp_path / "results" / "on-cluster" / "table.md").read_text()


def test_a_search_on_a_ray_head_tracked_by_an_mlflow_server(ray_head, mlflow_server, tiny_data_root, tmp_path):
    """Ray Tune's trials on the head's workers (its experiment state in the shared store), Optuna's study
    in the driver, every trial a run in the server."""
    uri, _ = mlflow_server
    (tmp_path / "s.yaml").write_text(tiny_spec(tiny_data_root, "search-on-cluster", teacher=False, student_epochs=1,
                                               extra="""search:
  space:
    student.schedule.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
  metric: train/loss
  num_samples: 2
  max_concurrent: 2
"""))
    done = driver(["run", "s.yaml", "--ray-address", ray_head, "--tracking-uri", uri, "--store", "store"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Search: 2 trials (0 failed); best train/loss" in done.stdout
    assert (tmp_path / "results" / "search-on-cluster" / "best_config.yaml").exists()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("search-on-cluster").experiment_id])
    trials = [r for r in runs if r.data.tags.get("detrdistill.kind") != "search"]
    assert len(trials) == 2 and all("train/loss" in r.data.metrics for r in trials)


def test_a_driver_without_the_token_is_told_what_is_missing(ray_head, tiny_data_root, tmp_path):
    (tmp_path / "c.yaml").write_text(tiny_spec(tiny_data_root, "no-token", teacher=False, student_epochs=1))
    done = driver(["run", "c.yaml", "--ray-address", ray_head], tmp_path, RAY_AUTH_MODE="disabled")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"the Ray cluster at {ray_head} answers but does not let this driver in" in done.stderr
    assert "RAY_AUTH_TOKEN" in done.stderr


def test_without_an_address_a_run_starts_its_own_ray_beside_a_running_head(ray_head, tiny_data_root, tmp_path):
    """Ray's ray.init() without an address joins the last cluster `ray start` began on this machine (and fails
    on our CPU count); a run without --ray-address must start its own, whatever else runs here."""
    (tmp_path / "c.yaml").write_text(tiny_spec(tiny_data_root, "own-ray", teacher=False, student_epochs=1))
    done = driver(["run", "c.yaml"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "results" / "own-ray" / "table.md").exists()


def test_no_ray_head_or_mlflow_server_there_fails_at_once(tiny_data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(tiny_spec(tiny_data_root, "nowhere", teacher=False, student_epochs=1))
    closed = free_port()  # nothing listens there
    started = time.time()
    assert main(["run", "c.yaml", "--ray-address", f"127.0.0.1:{closed}"]) == 2
    assert f"no Ray cluster answers at 127.0.0.1:{closed}" in capsys.readouterr().err
    assert main(["run", "c.yaml", "--ray-address", "head"]) == 2
    assert "--ray-address head: expected HOST:PORT" in capsys.readouterr().err
    for command in (["run", "c.yaml"], ["resume", "nowhere"], ["table", "nowhere"]):
        assert main([*command, "--tracking-uri", f"http://127.0.0.1:{closed}"]) == 2
        assert f"no MLflow server answers at http://127.0.0.1:{closed}" in capsys.readouterr().err
    assert time.time() - started < 30  # Ray alone waits over five minutes for a head that is not there
    assert not Path("mlflow.db").exists() and not Path("runs").exists()


def test_the_compose_stack_runs_the_processes_tested_here_and_wires_them_together():
    """docker/ cannot be built on this machine (no Docker engine): what can be checked is that its services
    start the same programs as the fixtures above, with flags the installed Ray and MLflow accept, that they
    point at each other, and that every Ray process sees the shared volume where the driver resolves paths."""
    import re

    import yaml
    root = Path(__file__).resolve().parents[1]
    services = yaml.safe_load((root / "docker" / "compose.yaml").read_text())["services"]
    dockerfile = (root / "docker" / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    makefile = (root / "Makefile").read_text()
    constraints = re.search(r"^PIN\s*:=\s*-c (\S+)$", makefile, re.M).group(1)  # torch pinned as the Makefile pins it
    assert "$(PIN) torch torchvision" in makefile
    assert f"pip install -c /src/{constraints} torch torchvision" in dockerfile
    for name in ("ray-head", "ray-worker", "driver"):
        service = services[name]
        assert f"shared:{workdir}" in service["volumes"], name
        assert service["environment"]["RAY_AUTH_MODE"] == "token", name
        assert service["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN"), name
    head, worker, server = (services[n]["command"] for n in ("ray-head", "ray-worker", "mlflow"))
    head_port = re.search(r"--port (\d+)", head).group(1)
    server_port = re.search(r"--port (\d+)", server).group(1)
    assert f"--address ray-head:{head_port}" in worker
    assert services["driver"]["environment"]["RAY_ADDRESS"] == f"ray-head:{head_port}"
    assert services["driver"]["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{server_port}"
    assert f"localhost:{server_port}/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    for command, program in ((head, ["ray", "start"]), (worker, ["ray", "start"]), (server, ["mlflow", "server"])):
        assert command.split()[:2] == program
        usage = subprocess.run([str(BIN / program[0]), program[1], "--help"], capture_output=True, text=True).stdout
        for flag in re.findall(r"(?<!\S)--[a-z][a-z-]*", command):
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", usage), f"{' '.join(program)} has no {flag}"


def test_token_mode_is_not_set_once_ray_is_imported(monkeypatch):
    """Set after Ray is imported, RAY_AUTH_MODE=token would not reach this process's Ray, but the local cluster
    it starts later would demand a token this process does not send (its start fails). Before the import
    (the CLI's own process) it is set."""
    import ray  # noqa: F401 - imported, as in a test or notebook that calls main()
    from orchestrator.cluster import use_ray_token_auth
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)  # a token at hand
    use_ray_token_auth("127.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in os.environ
    probe = ("import os; from orchestrator.cluster import use_ray_token_auth; "
             "use_ray_token_auth('127.0.0.1:6379'); print(os.environ.get('RAY_AUTH_MODE'))")
    fresh = subprocess.run([sys.executable, "-c", probe], env=user_env(RAY_AUTH_TOKEN="0" * 64),
                           capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "token"
