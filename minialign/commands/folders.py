"""What a folder minialign writes holds, checked before anything is written to it.

Every command that writes a folder (sft, dpo, rm, online: a training run; run: an experiment; eval: answers) first
asks ``check_folder`` whether the folder holds another command's results: a DPO run must not land in an SFT run,
a reward model in an experiment, answers in a training run. A folder's kind is its ``kind`` file (training runs
write one), else what it holds: ``run.yaml`` for `minialign run`, ``eval.json`` for `minialign eval`. A mismatch is
refused unless ``--overwrite``, which deletes the files of the kind found (``clear_folder``) before the new ones are
written. A training run's folder is written only once its run is ready to train (``prepare_run_dir``), so a start
refused for a bad setting leaves nothing behind. Reads and writes files only: nothing here loads a model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from minialign.base.errors import UserError
from minialign.config.presets import CONFIG_FILE, save_config

KIND_FILE = "kind"
# The entries each kind writes (a training kind not listed, e.g. online, writes at least TRAINING's).
TRAINING = ("checkpoints", "final", "metrics.jsonl", "summary.json", "ref_logps.safetensors", "config.yaml",
            "tensorboard", KIND_FILE)
OWNED = {"run": ("sft", "dpo", "plots", "results.json", "stages.json", "report.md", "report.html", "run.yaml"),
         "eval": ("eval.json", "eval.md")}
WHAT = {"run": "`minialign run` experiment", "eval": "`minialign eval` answers folder"}
STAGE_KINDS = {"sft": "sft", "dpo": "dpo"}  # a `minialign run` folder's training stages, each a run of that kind


def folder_kind(path: str | Path) -> str | None:
    """The command whose results ``path`` holds: its ``kind`` file, else run / eval by their files; None for a
    folder that holds no minialign results (or does not exist)."""
    path = Path(path)
    kind_file = path / KIND_FILE
    if kind_file.is_file():
        return kind_file.read_text(encoding="utf-8").strip() or None
    if (path / "run.yaml").is_file():
        return "run"
    if (path / "eval.json").is_file():
        return "eval"
    return None


def describe(kind: str) -> str:
    return WHAT.get(kind, f"`minialign {kind}` run")


def check_folder(path: str | Path, kind: str, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse to write ``kind``'s results into a folder that holds another command's (or, for ``run``, whose stage
    sub-folders do); with ``resume``, refuse to continue a folder of another kind. Same-kind folders are the
    caller's to judge (a new run over an old one, answers over answers)."""
    path = Path(path)
    found = folder_kind(path)
    if resume:
        if found is not None and found != kind:
            how = (f"resume it with `minialign {found} --resume {path}`" if found != "eval" else
                   "answers cannot be resumed")
            raise UserError(f"--resume {path}: that folder holds a {describe(found)}, not a {describe(kind)}; {how}. "
                            f"`minialign {kind} --resume` continues only a folder its own command wrote.")
        if kind == "run":
            _check_stages(path, overwrite=False)
        return
    if found is not None and found != kind and not overwrite:
        raise UserError(
            f"--out {path} holds a {describe(found)} (its files would be mixed with, or replaced by, this "
            f"{describe(kind)}'s). Give another --out, or add --overwrite to delete the {found} results there first."
            + (f" To continue it, use `minialign {found} --resume {path}`." if found != "eval" else ""))
    if kind == "run":
        _check_stages(path, overwrite=overwrite)


def _check_stages(path: Path, *, overwrite: bool) -> None:
    """A `minialign run` folder's ``sft/`` and ``dpo/`` are its stages: each must be a run of that kind, and a new
    experiment must not adopt runs that were there before it (``overwrite`` deletes them)."""
    own = (path / "run.yaml").is_file()
    for stage, kind in STAGE_KINDS.items():
        found = folder_kind(path / stage)
        if found is None or overwrite or (found == kind and own):
            continue
        what = "" if found == kind else f", not the {kind} run that stage is"
        raise UserError(f"{path / stage} holds a {describe(found)}{what}: `minialign run` in {path} would take it as "
                        f"its {stage} stage. Give another --out, or add --overwrite to delete it first.")


def clear_folder(path: str | Path, kinds: tuple[str, ...]) -> None:
    """Delete the entries ``kinds`` write in ``path`` (``--overwrite``), nothing else the folder holds."""
    path = Path(path)
    for kind in kinds:
        for name in OWNED.get(kind, TRAINING):
            entry = path / name
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def overwrite_kinds(path: str | Path, kind: str) -> tuple[str, ...]:
    """The kinds ``--overwrite`` clears to write ``kind`` into ``path``: its own and the one found there."""
    found = folder_kind(path)
    return (kind,) if found in (None, kind) else (found, kind)


def ever_trained(run_dir: str | Path) -> bool:
    """Whether a training run folder holds any result: metrics, a checkpoint or final weights."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in ("metrics.jsonl", "checkpoints", "final"))


def finished(run_dir: str | Path) -> bool:
    """A training run that reached its last step once: final weights and summary.json are written at the end."""
    final = Path(run_dir) / "final"
    return ((final / "adapter").is_dir() or (final / "model").is_dir()) and (Path(run_dir) / "summary.json").is_file()


def last_logged_step(run_dir: str | Path) -> int:
    """The last training step in metrics.jsonl (0 if none); a torn last line is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    step = 0
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row:
                step = max(step, int(row.get("step", 0)))
    return step


# ----------------------------------------------------------------------------- a training run's folder


def check_run_dir(cfg, kind: str, *, overwrite: bool) -> Path:
    """Refuse an --out that holds another command's results or another run (``cfg``: a ``TrainConfig``), before
    anything is loaded or written (``prepare_run_dir`` writes the folder once the run is ready to train)."""
    run_dir = Path(cfg.out)
    check_folder(run_dir, kind, overwrite=overwrite)
    existing = run_dir / CONFIG_FILE
    if existing.exists() and not overwrite:
        old = yaml.safe_load(existing.read_text()) or {}
        same = old == dataclasses.asdict(cfg)
        never = "" if ever_trained(run_dir) else (
            " It stopped before its first step (no metrics, checkpoints or final weights): --overwrite loses nothing.")
        raise UserError(
            f"{run_dir} already holds a {'run with this config' if same else 'run with a different config'}. "
            f"Continue it with `minialign {kind} --resume {run_dir}`, start over with --overwrite, or choose another "
            f"--out.{never}"
        )
    return run_dir


def prepare_run_dir(cfg, kind: str, *, overwrite: bool) -> Path:
    """Create the run folder (config.yaml, kind); refuse to reuse one holding another run unless told to overwrite,
    which deletes the results found there first. Call it on every rank; rank 0 writes."""
    from minialign.base import dist

    run_dir = check_run_dir(cfg, kind, overwrite=overwrite)
    dist.barrier()  # every rank has checked before rank 0 writes
    if overwrite and dist.rank() == 0:
        clear_folder(run_dir, overwrite_kinds(run_dir, kind))
    if dist.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
        (run_dir / KIND_FILE).write_text(kind)
    dist.barrier()
    return run_dir


# ----------------------------------------------------------------------------- eval answers


def judged_from(out: Path) -> list[Path]:
    """Sub-folders of ``out`` holding answers re-scored from ``out/eval.json`` (`minialign eval --answers`)."""
    source = (out / "eval.json").resolve()
    found = []
    for sub in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        try:
            saved = json.loads((sub / "eval.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and saved.get("answers_from") and Path(saved["answers_from"]).resolve() == source:
            found.append(sub)
    return found


def check_eval_out(out: str | Path, *, overwrite: bool) -> None:
    """`minialign eval --out OUT`, before any model is loaded: refuse another command's folder, and answers already
    there (and the folders re-scored from them) unless ``overwrite``. Reads only."""
    out = Path(out)
    check_folder(out, "eval", overwrite=overwrite)
    if folder_kind(out) == "eval" and not overwrite:
        judged = judged_from(out)
        scored = (f", which {', '.join(map(str, judged))} {'was' if len(judged) == 1 else 'were'} re-scored from"
                  if judged else "")
        raise UserError(f"--out {out} already holds the answers of an earlier `minialign eval` (eval.json{scored}). "
                        "Give another --out, or add --overwrite to replace them"
                        + (" (the folders re-scored from them are deleted too)." if judged else "."))


def replace_eval_out(out: str | Path) -> None:
    """Make room for new answers in ``out`` (``check_eval_out`` let them in): the folders re-scored from the answers
    being replaced, and another command's results there (--overwrite), are deleted."""
    out = Path(out)
    for sub in judged_from(out):
        shutil.rmtree(sub, ignore_errors=True)
        print(f"minialign eval: deleted {sub}, re-scored from the answers being replaced")
    if folder_kind(out) not in (None, "eval"):
        clear_folder(out, overwrite_kinds(out, "eval"))
