"""`--resume RUN_DIR` with flags: which config changes a run can take, and what is left of it to train.

A resumed run reads its own config.yaml; flags typed with ``--resume`` (or a ``--config`` file) ask to change it.
Changes that leave the steps already taken valid (``SAFE``: the run's length, how often it logs, evaluates and saves,
trackers, speed and memory switches that compute the same function) are applied and recorded in config.yaml; any
other difference is refused with every differing field and its old and new value, never dropped in silence. More
epochs or max steps extend the run from its last checkpoint, the learning-rate schedule recomputed over the new
length (as a run started with those settings would have it). A finished run asked for nothing new is left untouched.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from minialign.base import dist
from minialign.base.errors import UserError
from minialign.commands import folders
from minialign.config.cli_help import show_value
from minialign.config.presets import build, load_run_config, save_config
from minialign.training import checkpoint

LENGTH = ("epochs", "max_steps")
SAFE = (*LENGTH, "save_every", "eval_every", "log_every", "keep_last", "report_to", "cache", "compile",
        "compile_mode", "compile_scope", "grad_checkpointing", "loss_chunk_size")
RUN_SAFE = ("stages",)  # `minialign run --resume`: stages not done yet may be added or dropped
IGNORED = ("dist",)  # how the processes share the work is how a run is launched, not part of it


class Finished(Exception):
    """A resumed run that has nothing left to train and was asked for nothing new: its recipe returns at once."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def unless_finished(recipe):
    """``recipe(cfg, resume=..., overwrite=...)``, returning the run folder untouched when it raises ``Finished``."""

    @functools.wraps(recipe)
    def run(cfg, **kwargs) -> Path:
        try:
            return recipe(cfg, **kwargs)
        except Finished as done:
            return done.run_dir

    return run


def changes(old, new) -> dict[str, tuple]:
    """``{field: (old value, new value)}`` of every field two configs of one class disagree on."""
    a, b = dataclasses.asdict(old), dataclasses.asdict(new)
    return {k: (a[k], b[k]) for k in a if k not in IGNORED and a[k] != b[k]}


def listed(changed: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {show_value(old)} -> {show_value(new)}" for k, (old, new) in changed.items())


def refuse_unsafe(run_dir: Path, command: str, changed: dict[str, tuple], safe: tuple[str, ...] = SAFE) -> None:
    """UserError naming every changed field when any of them is not ``safe`` to change in a resumed run."""
    unsafe = {k: v for k, v in changed.items() if k not in safe}
    if not unsafe:
        return
    rest = {k: v for k, v in changed.items() if k in safe}
    raise UserError(
        f"`minialign {command} --resume {run_dir}` continues the run with its own config.yaml, but the settings given "
        f"change {listed(unsafe)}{f' (and {listed(rest)})' if rest else ''}: a resumed run keeps the settings its "
        f"earlier steps and metrics were made with. A resume may change only {', '.join(safe)}. "
        "Drop the other flags, or start a new run with them "
        "(another --out, or --overwrite to replace this one).")


def check_left_to_train(run_dir: Path, cfg, at: int, old_total: int, new_total: int, changed: dict[str, tuple]) -> None:
    """Refuse a resume whose changes cannot apply, say on stdout what the accepted ones do, and raise ``Finished``
    for a finished run asked for nothing. ``at``: the step of the checkpoint the run continues from (0: none);
    ``old_total`` / ``new_total``: the run's length by its saved config and by ``cfg``."""
    say = print if dist.rank() == 0 else (lambda *args: None)
    longer = new_total != old_total
    done = folders.finished(run_dir) and folders.last_logged_step(run_dir) >= old_total
    reached = old_total if done else at
    if longer and new_total < reached:
        raise UserError(f"--resume {run_dir}: the run has trained {reached} steps already, but {listed(_length(changed))} "
                        f"would end it at step {new_total}. A run cannot be shortened; raise --epochs or --max-steps "
                        "to extend it, or start a new run (another --out, or --overwrite).")
    if done and not longer:
        if changed:
            raise UserError(f"--resume {run_dir}: the run finished at step {old_total}, so {listed(changed)} would "
                            "change nothing: no step is left to train. Raise --epochs or --max-steps to extend it.")
        say(f"minialign: {run_dir} finished at step {old_total}; nothing left to train (raise --epochs or "
              "--max-steps to extend it).")
        raise Finished(run_dir)
    if done and at < old_total:
        raise UserError(
            f"--resume {run_dir}: the run finished at step {old_total} but kept no checkpoint of that step "
            f"({'its last is step ' + str(at) if at else 'it kept none'}; --save-every 0 keeps only the final weights, "
            "not the optimizer's state), so it cannot be extended exactly. Start a new run from its result "
            "(--model RUN_DIR/final/model, --adapter RUN_DIR/final/adapter or dpo --sft RUN_DIR), or run it again "
            "longer with --overwrite (and --save-every N to extend it later).")
    if longer:
        say(f"minialign: resuming {run_dir} at step {at} with {listed(_length(changed))}: the run now ends at step "
              f"{new_total} instead of {old_total}, and its learning-rate schedule ({cfg.schedule}, warm-up ratio "
              f"{cfg.warmup_ratio:g}) is recomputed over {new_total} steps, as a run started with these settings has "
              f"it: the rate at step {at} goes from {_lr(cfg, at, old_total):.3g} to {_lr(cfg, at, new_total):.3g}.")
    others = {k: v for k, v in changed.items() if not (longer and k in LENGTH)}
    if others:
        say(f"minialign: resuming {run_dir} with {listed(others)}.")


def _length(changed: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v for k, v in changed.items() if k in LENGTH}


def _lr(cfg, step: int, total: int) -> float:
    from minialign.training.optim import schedule_factor

    return cfg.lr * schedule_factor(step, total, cfg)


# ----------------------------------------------------------------------------- a training run resumed


def resume_config(run_dir: Path, cls, kind: str | None = None, requested: dict | None = None):
    """The config a run folder was started with (``out``: the folder), ``requested`` changes over it (``changes``
    are checked by ``resume_changes``); ``kind``: refuse a folder of another kind first."""
    if kind is not None:
        folders.check_folder(run_dir, kind, resume=True)
    cfg = load_run_config(run_dir, cls)
    cfg.out = str(run_dir)
    return build(cls, dataclasses.asdict(cfg), requested) if requested else cfg


def resume_changes(cfg, kind: str, safe: tuple[str, ...] = SAFE) -> dict[str, tuple]:
    """What ``cfg`` changes in the config of the run it resumes (its folder must be a ``kind`` run); refused
    unless every change is one a resume can take (``safe``: this command's list, ``SAFE`` for training runs)."""
    run_dir = Path(cfg.out)
    folders.check_folder(run_dir, kind, resume=True)
    changed = changes(resume_config(run_dir, type(cfg)), cfg)
    refuse_unsafe(run_dir, kind, changed, safe)
    return changed


def check_run_length(run_dir: Path, cfg, point: Path | None, changed: dict[str, tuple], n: int) -> None:
    """``check_left_to_train`` with the run's length by its saved config and by ``cfg`` (``n``: the training
    examples, or packed rows, as ``train.train`` counts them)."""
    from minialign.training.train import planned_steps

    at = checkpoint.read_progress(point).get("step", 0) if point is not None else 0
    saved = resume_config(run_dir, type(cfg))
    before = dataclasses.replace(cfg, epochs=saved.epochs, max_steps=saved.max_steps)
    old_total = planned_steps(n, before, dist.rank(), dist.world_size())[1]
    new_total = planned_steps(n, cfg, dist.rank(), dist.world_size())[1]
    check_left_to_train(run_dir, cfg, at, old_total, new_total, changed)


def open_run_dir(cfg, kind: str, *, resume: bool, overwrite: bool, safe: tuple[str, ...] = SAFE) -> Path:
    """The run folder, written just before the run's first result: a new run's (``folders.prepare_run_dir``), or a
    resumed run's config.yaml updated with the changes its resume took (``safe``; the others were refused)."""
    if not resume:
        return folders.prepare_run_dir(cfg, kind, overwrite=overwrite)
    run_dir = Path(cfg.out)
    saved = resume_config(run_dir, type(cfg))
    updated = dataclasses.replace(saved, **{name: getattr(cfg, name) for name in safe})
    if updated != saved and dist.rank() == 0:
        save_config(updated, run_dir / folders.CONFIG_FILE)
    return run_dir


def resume_point(run_dir: Path, resume: bool, cfg) -> Path | None:
    """The checkpoint to continue from; ``cfg``'s per-device batch is fitted to the global batch it was trained with."""
    if not resume:
        return None
    point = checkpoint.latest_checkpoint(run_dir)
    if point is None:
        if dist.rank() == 0:
            print(f"minialign: {run_dir} has no complete checkpoint yet; starting from step 0.")
        return None
    keep_global_batch(cfg, point)
    return point


def keep_global_batch(cfg, point: Path) -> None:
    """A run resumed on another number of processes keeps its global batch: the per-device batch is rescaled."""
    saved = checkpoint.read_progress(point).get("global_batch", 0)
    world = dist.world_size()
    if not saved or saved == cfg.batch_size * world * cfg.grad_accum:
        return
    per_device, rest = divmod(saved, world * cfg.grad_accum)
    if rest or not per_device:
        raise UserError(
            f"{point} was trained with a global batch of {saved} examples, which {world} process(es) x {cfg.grad_accum} "
            f"accumulation cannot split evenly; resume with a number of processes that divides {saved // cfg.grad_accum}."
        )
    if dist.rank() == 0:
        print(f"minialign: resuming with {world} process(es): per-device batch {cfg.batch_size} -> {per_device}, "
              f"keeping the global batch of {saved}.")
    cfg.batch_size = per_device
