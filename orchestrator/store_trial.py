"""Train one planned trial in its store folder: the part of running a trial that needs neither Ray nor MLflow.

The scheduler's Ray task and benchmarks/run_local.py (a GPU host without Ray) both run trials through
`train_in_store`, so the store folder (plan.py) looks the same whoever trained it.
"""
import json
import os
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from orchestrator.plan import CHECKPOINT, LOG, PID, TRIAL, write_result

# on_event(kind, payload): "started" {"pid", "resuming"}, "log" line, "epoch" metrics
OnEvent = Callable[[str, object], None]


def train_in_store(node_hash: str, config_json: dict, workdir: str, on_event: OnEvent) -> dict:
    """Train (or resume from its checkpoint) one trial in `workdir`, writing trial.json, the log, and
    result.json last. Returns the result: final metrics and the whole per-epoch history."""
    from trainers.checkpoint import load_checkpoint
    from trainers.config import TrialConfig
    from trainers.engine import run_trial

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / PID).write_text(f"{os.getpid()}\n")
    (work / TRIAL).write_text(json.dumps(config_json, indent=1))
    config = TrialConfig.model_validate(config_json)
    resuming = (work / CHECKPOINT).exists()
    on_event("started", {"pid": os.getpid(), "resuming": resuming})
    history: list[dict] = []
    with open(work / LOG, "a", buffering=1) as log_file:
        def log(line: str) -> None:
            log_file.write(line + "\n")
            on_event("log", line)

        def report(metrics: dict, checkpoint: Optional[Path]) -> None:
            history.append(metrics)
            on_event("epoch", metrics)

        log_file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} "
                       f"{'resumes from its checkpoint' if resuming else 'starts'}\n")
        try:
            final = run_trial(config, work, report=report, log=log)
        except BaseException:
            log_file.write(traceback.format_exc())
            raise
    if resuming:  # the epochs before the checkpoint were reported by an earlier attempt
        history = load_checkpoint(work / CHECKPOINT)["history"]
    result = {"hash": node_hash, "name": config.name, "metrics": final, "history": history,
              "finished_at": time.time()}
    write_result(work, result)
    return result
