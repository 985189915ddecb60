"""metrics.jsonl and the experiment trackers (``--report-to``) that mirror it under the names TRL's trainers give.

``MetricsLog`` keeps the loop's per-step metrics on the device until a flush, so the step never waits for the
GPU, then appends them to metrics.jsonl, the record of a run. A tracker only mirrors that file, so that runs of
minialign and of TRL land in one dashboard with comparable curves. Names follow transformers' ``rewrite_logs``
(``train/`` or ``eval/`` prefix) and TRL's keys (``rewards/chosen``, ``logps/rejected``, ``learning_rate``,
``num_tokens`` ...). Every tracker package is optional (``pip install 'minialign[wandb]'``); only rank 0 opens one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from minialign.base.errors import UserError
from minialign.config.fields import TRACKERS, split_list
from minialign.config.schema import TrainConfig

# The package each tracker needs; tests point one at a name that does not import.
PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
# metrics.jsonl keys whose TRL / transformers name differs (the rest only gain the train/ or eval/ prefix).
RENAMES = {"lr": "learning_rate", "tokens": "num_tokens"}


def tracker_name(key: str) -> str | None:
    """The TRL name of a metrics.jsonl key: ``loss`` -> ``train/loss``, ``lr`` -> ``train/learning_rate``,
    ``eval/rewards/accuracies`` stays; ``step`` is the x axis, not a metric (None)."""
    if key == "step":
        return None
    split, _, name = key.partition("/") if key.startswith("eval/") else ("train", "", key)
    return f"{split}/{RENAMES.get(name, name)}"


def tracker_metrics(row: dict) -> dict[str, float]:
    """A metrics row's numbers under their tracker names (strings and flags are left out)."""
    out = {}
    for key, value in row.items():
        name = tracker_name(key)
        if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def requested(report_to: str) -> list[str]:
    """The trackers a ``report_to`` value names (``none`` names none)."""
    return [name for name in split_list(report_to) if name != "none"]


def check_available(report_to: str) -> None:
    """Every named tracker is known and its package installed: checked before anything is written."""
    for name in requested(report_to):
        if name not in PACKAGES:
            raise UserError(f"--report-to {name}: unknown tracker; choose from {', '.join(TRACKERS)} "
                            "(comma-separated for several).")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"--report-to {name} needs the {PACKAGES[name]} package, which is not installed: run "
                            f"`pip install {PACKAGES[name]}` (or `pip install 'minialign[{name}]'`), or drop "
                            f"{name} from --report-to.")


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files in RUN_DIR/tensorboard (``tensorboard --logdir runs``)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandBStyle:
    """wandb, and trackio, which copies its module-level API: ``init(project, name, config)``,
    ``log(metrics, step=)``, ``finish()``. Only wandb takes a folder for its files; trackio keeps its own store."""

    def __init__(self, package: str, run_dir: Path, project: str, name: str, config: dict) -> None:
        self.module = importlib.import_module(package)
        where = {"dir": str(run_dir)} if package == "wandb" else {}
        self.module.init(project=project, name=name, config=config, **where)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.module.log(metrics, step=step)

    def close(self) -> None:
        self.module.finish()


class MLflow:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(project)
        mlflow.start_run(run_name=name)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS = {"tensorboard": TensorBoard, "wandb": functools.partial(WandBStyle, "wandb"),
            "trackio": functools.partial(WandBStyle, "trackio"), "mlflow": MLflow}


class Trackers:
    """The trackers of one run behind one interface: ``log(step, row)`` with metrics.jsonl keys, ``close()``."""

    def __init__(self, report_to: str, run_dir: Path, config: dict) -> None:
        check_available(report_to)
        run_dir = Path(run_dir).resolve()
        # The run folder names the run, its parent the project (runs/sft -> project "runs", run "sft").
        project, name = run_dir.parent.name or "minialign", run_dir.name
        self.trackers: list[Tracker] = []
        try:
            for tracker in requested(report_to):
                self.trackers.append(BACKENDS[tracker](run_dir, project, name, config))
        except BaseException:
            self.close()
            raise

    def log(self, step: int, row: dict) -> None:
        metrics = tracker_metrics(row)
        if metrics:
            for tracker in self.trackers:
                tracker.log(step, metrics)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


@dataclass
class MetricsLog:
    """Per-step metrics kept as device tensors until ``flush``, then appended as JSON lines."""

    path: Path | None
    trackers: Trackers | None = None  # --report-to: rows mirrored to TensorBoard, W&B, ... (rank 0)
    pending: list[tuple[int, dict]] = field(default_factory=list)

    @contextlib.contextmanager
    def tracking(self, cfg: TrainConfig, run_dir: Path | None):
        """Open the trackers ``cfg.report_to`` names for the loop's duration (only where metrics are written)."""
        if self.path is None or run_dir is None or not requested(cfg.report_to):
            yield self
            return
        self.trackers = Trackers(cfg.report_to, run_dir, dataclasses.asdict(cfg))
        try:
            yield self
        finally:
            self.trackers.close()
            self.trackers = None

    def add(self, step: int, values: dict) -> None:
        self.pending.append((step, values))

    def flush(self) -> list[dict]:
        if not self.pending:
            return []
        keys = sorted({k for _, v in self.pending for k, x in v.items() if torch.is_tensor(x)})
        stacked = torch.stack([torch.stack([v[k].float() for k in keys]) for _, v in self.pending]).cpu().tolist()
        rows = []
        for (step, values), numbers in zip(self.pending, stacked):
            row = {"step": step, **{k: x for k, x in values.items() if not torch.is_tensor(x)}, **dict(zip(keys, numbers))}
            rows.append(row)
        self.pending.clear()
        self.write(rows)
        return rows

    def write(self, rows: list[dict]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            if not _ends_with_newline(self.path):  # a killed run left half a row: start a fresh line
                fh.write("\n")
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            fh.flush()
        if self.trackers is not None:
            for row in rows:
                self.trackers.log(row["step"], row)


def _ends_with_newline(path: Path) -> bool:
    """True for an empty file or one whose last byte is a newline."""
    with open(path, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
