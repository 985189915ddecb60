"""Evaluation on several axes: a suite YAML names prompt sets ("axes"), each with its own rows, prompt count and
judge; `minialign eval --suite` and `minialign run --eval-suite` answer every axis's prompts with the policy and
its reference and write one table per axis plus a combined one.

Why: one judge on one prompt set hides trade-offs. A harmless-only DPO recipe wins by a harmless judge on harmless
prompts because it stopped answering; a helpfulness judge on helpful prompts, and the evasion share, show the price.

Relative paths in a suite (``dataset`` parts, ``judge``) are taken from the current directory when they exist there,
else from the suite file's folder (``resolve_path``); eval.json records the resolved paths.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from minialign.base.errors import UserError
from minialign.commands.folders import check_eval_out
from minialign.config.evaluation import EvalConfig
from minialign.config.fields import parse_rows
from minialign.evaluation.evalrows import RowSet, check_not_trained_on, load_prompts
from minialign.evaluation.geneval import Decoding, EvalPrompt
from minialign.reporting.suite import suite_text

AXIS_KEYS = ("name", "dataset", "rows", "n", "judge", "data_dir", "split")
REQUIRED = ("name", "dataset", "rows")
SUMMARY_MODE = "greedy"  # the summary's numbers: one answer a prompt, as the measurements


@dataclass(frozen=True)
class Axis:
    """One prompt set of a suite: raw ``rows`` (START:STOP) of ``dataset``, the first ``n`` usable prompts (0: the
    command's --n), scored by ``judge`` (a `minialign rm` run folder; "" for metrics without a win rate)."""

    name: str
    dataset: str
    rows: str
    n: int = 0
    judge: str = ""
    data_dir: str = ""
    split: str = "test"

    def row_set(self) -> RowSet:
        return RowSet(self.dataset, self.split, self.data_dir, self.rows)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_path(value: str, folder: Path) -> str:
    """``value`` as given when it exists from the current directory (or is absolute), else from ``folder`` (the
    suite's) when it exists there, else as given: a hub id, or a missing path whose error comes later."""
    if not value or Path(value).is_absolute() or _exists(value):
        return value
    there = str(folder / value)
    return there if _exists(there) else value


def _exists(path: str) -> bool:
    return bool(glob.glob(path)) if any(c in path for c in "*?[") else Path(path).exists()


def load_suite(path: str, flag: str = "--suite") -> list[Axis]:
    """The axes of a suite YAML, checked: the file, its ``axes`` list, every axis's fields (required ones present,
    no unknown keys, types, rows of the form START:STOP, unique names, an existing judge folder). Errors name the
    file, the axis and the field."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{flag} {path}: no such file. Give a suite YAML file (docs/evaluation.md, 'Two axes').")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path} is not valid YAML ({e}).") from None
    if not isinstance(data, dict) or "axes" not in data:
        raise UserError(f"{flag} {path} must be a YAML mapping with an 'axes' list (one entry per prompt set, each "
                        "with name, dataset and rows); docs/evaluation.md, 'Two axes', shows one.")
    unknown = sorted(set(data) - {"axes"})
    if unknown:
        raise UserError(f"{flag} {path}: unknown top-level key(s) {', '.join(map(repr, unknown))}; a suite holds only "
                        "'axes'.")
    if not isinstance(data["axes"], list) or not data["axes"]:
        raise UserError(f"{flag} {path}: 'axes' must be a non-empty list of axes (name, dataset, rows, and optional "
                        f"{', '.join(AXIS_KEYS[3:])}); got {data['axes']!r}.")
    axes = [_axis(entry, i, path, flag, file.resolve().parent) for i, entry in enumerate(data["axes"], 1)]
    names = [a.name for a in axes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{flag} {path}: axis name(s) {', '.join(map(repr, twice))} used more than once; every axis "
                        "needs its own name (it keys eval.json's 'axes' and 'summary').")
    return axes


def _axis(entry: Any, i: int, path: str, flag: str, folder: Path) -> Axis:
    """Axis number ``i`` (1-based) of the suite, checked field by field."""
    if not isinstance(entry, dict):
        raise UserError(f"{flag} {path}: axis {i} must be a mapping of {', '.join(AXIS_KEYS)}; got {entry!r}.")
    where = f"{flag} {path}, axis {i}" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")
    unknown = sorted(set(entry) - set(AXIS_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; an axis takes "
                        f"{', '.join(AXIS_KEYS)}.")
    for key in REQUIRED:
        if entry.get(key) in (None, ""):
            raise UserError(f"{where}: field '{key}' is missing; every axis needs {', '.join(REQUIRED)}.")
    for key in ("name", "dataset", "rows", "judge", "data_dir", "split"):
        if key in entry and entry[key] is not None and not isinstance(entry[key], str):
            hint = (" Write START:STOP in quotes: YAML reads an unquoted 10:50 as the number 650." if key == "rows"
                    else "")
            raise UserError(f"{where}: field '{key}' must be a string, got {entry[key]!r}.{hint}")
    try:
        parse_rows(entry["rows"])
    except UserError as e:
        raise UserError(f"{where}: field 'rows': {e}") from None
    n = entry.get("n", 0)
    if "n" in entry and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"{where}: field 'n' must be a whole number >= 1 (prompts of this axis), got {n!r}; leave it "
                        "out to use the command's --n.")
    judge = resolve_path(entry.get("judge") or "", folder)
    if judge and not Path(judge).is_dir():
        raise UserError(f"{where}: field 'judge': no folder {entry['judge']!r} (looked in the current directory and "
                        f"in {folder}). Give a `minialign rm` run folder, or leave 'judge' out for metrics without a "
                        "win rate.")
    dataset = ",".join(resolve_path(part.strip(), folder) for part in entry["dataset"].split(","))
    return Axis(entry["name"], dataset, entry["rows"], n, judge, entry.get("data_dir") or "",
                entry.get("split") or "test")


def check_judges(axes: list[Axis], suite: str, tokenizer, tokenizer_label: str, flag: str = "--suite") -> None:
    """Every axis's judge is a finished reward model reading the policy's vocabulary (``evalsides.check_judge``)."""
    from minialign.commands.evalsides import check_judge

    for axis in axes:
        if axis.judge:
            check_judge(axis.judge, f"{flag} {suite} axis {axis.name!r}: judge", tokenizer, tokenizer_label)


def axis_prompts(axes: list[Axis], suite: str, n: int, chat_tokenizer, trained: list[tuple[str, RowSet]], *,
                 flag: str = "--suite") -> list[tuple[Axis, list[EvalPrompt]]]:
    """Every axis's prompts (its ``n``, else ``n``: a cap, as ``load_prompts`` takes it), each refused if a model
    trained on them: all checked before any answer is generated."""
    plans = []
    for axis in axes:
        try:
            prompts = load_prompts(axis.row_set(), axis.n or n, chat_tokenizer=chat_tokenizer, flag=flag)
            check_not_trained_on(prompts, axis.row_set(), trained)
        except UserError as e:
            raise UserError(f"{flag} {suite}, axis {axis.name!r} ({axis.row_set().label()}): {e}") from None
        plans.append((axis, prompts))
    return plans


def judged_axes(policy, reference, tokenizer, plans: list[tuple[Axis, list[EvalPrompt]]],
                trained: list[tuple[str, RowSet]], decoding: Decoding, device, *, judge_batch_size: int = 32,
                common: dict | None = None) -> dict:
    """``evalsides.judged_compare`` once per axis, with that axis's judge: ``{"axes": {name: one-axis eval.json},
    "summary": {name: axis_summary}}``. ``common`` (policy and reference labels, tokenizer, chat template) goes into
    every axis, so each is a complete one-axis result (``--answers`` and the report read them as such)."""
    from minialign.commands.evalsides import judged_compare

    axes = {}
    for axis, prompts in plans:
        print(f"minialign eval: axis {axis.name}: {len(prompts)} prompts from {axis.row_set().label()}"
              + (f", judge {axis.judge}" if axis.judge else ", no judge"))
        results = judged_compare(policy, reference, tokenizer, prompts, axis.row_set(), trained, decoding, device,
                                 judge_path=axis.judge, judge_batch_size=judge_batch_size)
        axes[axis.name] = {**(common or {}), "axis": axis.to_dict(), **results}
    return {"axes": axes, "summary": {name: axis_summary(r) for name, r in axes.items()}}


def axis_summary(results: dict) -> dict:
    """The policy's headline numbers on one axis (greedy answers): win rate and CI, evasion, loops, EOS share, mean
    length, the judge's held-out accuracy and rows, prompts; and the reference's evasion/loops/EOS/length beside them."""
    entry = results["modes"][SUMMARY_MODE]
    win = entry.get("win_rate") or {}
    judge = results.get("judge") or {}

    def side(name: str) -> dict:
        m = entry[name]
        return {"evasion": m.get("evasion_share"), "loops": m["loop_share"], "eos": m["finished_share"],
                "mean_tokens": m["mean_tokens"]}

    return {"mode": SUMMARY_MODE, "win_rate": win.get("rate"), "low": win.get("low"), "high": win.get("high"),
            **side("policy"), "judge_accuracy": judge.get("heldout_accuracy"), "judge_rows": judge.get("judge_rows"),
            "n": results["n_prompts"], "win_engaged": engaged_win(results), "reference": side("reference")}


def engaged_win(results: dict) -> dict | None:
    """The greedy win rate over only the prompts whose policy answer does not evade (ties 1/2, 95% bootstrap CI
    seeded as the headline's), with their count; None without a judge or when every answer evades. A policy that
    wins its axis by declining shows a headline well above it: in the two-axis study a harmless win of 0.76 on
    validation was 0.66 over the answers that engaged (benchmarks/results/hh-answers.json)."""
    from minialign.evaluation.textmetrics import win_rate

    answers = [(r["policy"][SUMMARY_MODE][0], r["reference"][SUMMARY_MODE][0]) for r in results["prompts"]]
    kept = [(p["judge_score"], q["judge_score"]) for p, q in answers if "judge_score" in p and not p["evades"]]
    if not kept:
        return None
    w = win_rate([p for p, _ in kept], [q for _, q in kept], seed=(results.get("decoding") or {}).get("seed", 0))
    return {"rate": w.rate, "low": w.low, "high": w.high, "n": len(kept)}


def run_suite_eval(cfg: EvalConfig, out: Path) -> Path:
    """`minialign eval --suite FILE`: every input (suite, judges, prompts of every axis, row overlaps) checked first,
    then each axis answered and judged; eval.json and eval.md written once, at the end."""
    from minialign.base.devices import resolve_device
    from minialign.commands.evalsides import load_models, policy_training, run_tokenizer, use_chat, write_outputs
    from minialign.modeling.models import load_tokenizer

    axes = load_suite(cfg.suite)
    device = resolve_device(cfg.device)
    tokenizer_label = cfg.tokenizer or run_tokenizer(cfg.policy)
    tokenizer = load_tokenizer(tokenizer_label)
    check_judges(axes, cfg.suite, tokenizer, tokenizer_label)
    policy, reference, ref_label = load_models(cfg, tokenizer)
    chat = use_chat(cfg, policy)
    trained = policy_training(policy)
    plans = axis_prompts(axes, cfg.suite, cfg.n, tokenizer if chat else None, trained)
    print(f"minialign eval: policy {policy.label}; reference {ref_label}; suite {cfg.suite} ({len(axes)} axes)")
    decoding = Decoding(cfg.max_new_tokens, cfg.samples, cfg.temperature, cfg.top_p, cfg.seed, cfg.batch_size or None)
    common = {"policy": policy.label, "reference": ref_label, "chat_template": chat, "tokenizer": tokenizer_label}
    results = judged_axes(policy.model, reference, tokenizer, plans, trained, decoding, device,
                          judge_batch_size=cfg.judge_batch_size, common=common)
    results = {**common, "config": dataclasses.asdict(cfg), "suite": suite_record(cfg.suite, axes),
               "policy_trained": [{"what": what, **r.to_dict()} for what, r in trained], **results}
    write_outputs(out, results, cfg.show)
    print(suite_text(results))
    print(f"minialign eval: wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return out


def suite_record(path: str, axes: list[Axis]) -> dict:
    """What eval.json keeps of the suite: its file and every axis with its paths resolved."""
    return {"file": str(path), "axes": [a.to_dict() for a in axes]}


def rescore_suite(cfg: EvalConfig, path: Path, saved: dict) -> Path:
    """`minialign eval --answers SUITE_EVAL --suite FILE`: each saved axis scored again by the judge FILE names for
    the axis of that name (an axis without a judge: metrics only). FILE must read the same rows per axis."""
    from minialign.commands.evalsides import rescored, write_outputs

    if "axes" not in saved:
        raise UserError(f"--answers {path} holds a one-axis eval, not a suite's: re-score it with --judge, not --suite.")
    if not cfg.suite:
        raise UserError(f"--answers {path} holds a suite eval (axes {', '.join(saved['axes'])}): give --suite FILE "
                        "instead of --judge; each axis is scored by the judge FILE names for the axis of that name.")
    axes = {a.name: a for a in load_suite(cfg.suite)}
    missing = [name for name in saved["axes"] if name not in axes]
    if missing:
        raise UserError(f"--suite {cfg.suite} has no axis named {', '.join(map(repr, missing))}, which the answers in "
                        f"{path} hold; name every saved axis ({', '.join(saved['axes'])}) in the suite.")
    out = Path(cfg.out or path.parent / f"judged-{Path(cfg.suite).stem}")
    if out.resolve() == path.parent.resolve():
        raise UserError(f"--out {out} is the folder of the answers being re-scored: its eval.json would be "
                        "replaced. Give another --out.")
    check_eval_out(out, overwrite=cfg.overwrite)
    shared = {k: saved[k] for k in ("policy", "reference", "chat_template", "tokenizer") if k in saved}
    results: dict[str, Any] = {}
    for name, one in saved["axes"].items():
        axis = axes[name]
        if not isinstance(one, dict) or not one.get("prompts") or "decoding" not in one:
            raise UserError(f"--answers {path}: axis {name!r} holds no answers; it is not an eval.json written by "
                            "`minialign eval --suite`. Generate the answers again.")
        saved_rows = RowSet.from_dict(one["prompt_rows"]) if "prompt_rows" in one else None
        if saved_rows is not None and (saved_rows.key, saved_rows.rows) != (axis.row_set().key, axis.rows):
            raise UserError(f"--suite {cfg.suite}, axis {name!r}: it reads {axis.row_set().label()}, but the saved "
                            f"answers of that axis came from {one.get('prompt_source')}. Re-score with a suite whose "
                            "axes name the same dataset and rows (only the judges may differ).")
        results[name] = {**rescored(cfg, path, {**shared, **one}, axis.judge,
                                    f"--suite {cfg.suite} axis {name!r}: judge"), "axis": axis.to_dict()}
    results = {**shared, "answers_from": str(path), "config": dataclasses.asdict(cfg),
               "suite": suite_record(cfg.suite, list(axes.values())),
               "axes": results, "summary": {name: axis_summary(r) for name, r in results.items()}}
    write_outputs(out, results, cfg.show)
    print(suite_text(results))
    print(f"minialign eval: wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return out


# ----------------------------------------------------------------------------- presentation


