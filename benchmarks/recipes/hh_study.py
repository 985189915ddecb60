"""The two-axis study's bookkeeping (``hh_two_axes.py`` runs its phases): paths, the state document that a cut-off
call resumes from, and one recorded command at a time. Imported by ``hh_two_axes.py``, which puts this folder and
``benchmarks/`` on ``sys.path`` first."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import hh_plan as plan
import hh_results as results
from bench_e2e import _read_json, child_env, run_timed

from minialign.base.devices import device_name, resolve_device
from minialign.base.files import write_atomic

T = TypeVar("T")
R = TypeVar("R")


class Study:
    """Paths, the state document and the recorded commands (``--jobs`` of them at once, in threads: the state is
    changed and saved under ``lock``)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.work, self.out = args, Path(args.work).resolve(), Path(args.out)
        self.plan = plan.small_plan(plan.ROW_PLAN) if args.small else plan.ROW_PLAN
        plan.check_plan(self.plan)
        self.chat = [] if args.small else ["--chat-template"]
        self.tokenizer = "demo" if args.small else args.model
        self.cut = plan.SMALL_TRAIN if args.small else []  # appended to training commands
        self.state = _read_json(self.work / "state.json") or {
            "rows": self.plan, "held_out": list(plan.HELD_OUT), "judges": {}, "candidates": {}, "policies": {},
            "steps": [], "notes": [], "decline_check": results.decline_check_source()}
        self.state.setdefault("invocations", []).append(shlex.join([Path(sys.executable).name, *sys.argv]))
        self.env = child_env(self.work / "probe", False)
        self.device = device_name(resolve_device("auto"))  # each step records it: a resumed study may mix machines
        self.state.setdefault("device", self.device)
        self.lock = threading.RLock()
        self.local = threading.local()  # .shared: this thread's commands run beside others (``each``)

    def each(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items``, ``--jobs`` at a time (their commands share the one GPU); the results in order, the
        first error raised once every started job has ended."""
        items = list(items)
        if self.args.jobs <= 1 or len(items) <= 1:
            return [fn(x) for x in items]

        def job(x: T) -> R:
            self.local.shared = True
            return fn(x)

        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            return list(pool.map(job, items))

    def data(self, axis: str) -> str:
        return plan.dataset_path(self.args.data_root, axis)

    def run(self, name: str, argv: list[str]) -> dict:
        print(f"[hh2] {name}: {shlex.join(argv)}", flush=True)
        done = run_timed([sys.executable, *argv], self.work / "logs" / f"{name}.log", self.args.timeout_s, self.env)
        step = {"name": name, "command": done["command"], "wall_s": round(done["elapsed_s"], 2),
                "returncode": done["returncode"], "timed_out": done["timed_out"], "log_tail": done.get("log_tail"),
                "device": self.device, "shared_gpu": getattr(self.local, "shared", False)}  # then no timing
        print(f"[hh2] {name}: rc {step['returncode']} in {step['wall_s']:.1f} s", flush=True)
        with self.lock:
            self.state["steps"].append(step)
            self.save()
        return step

    def minialign(self, name: str, *flags: str) -> dict:
        return self.run(name, ["-m", "minialign", *flags])

    def last_step(self, name: str) -> dict:
        with self.lock:
            return next((s for s in reversed(self.state["steps"]) if s["name"] == name), {})

    def save(self) -> None:
        with self.lock:
            self.work.mkdir(parents=True, exist_ok=True)
            write_atomic(self.work / "state.json", json.dumps(self.state, indent=1))
            doc = results.build_summary(self.state)
            write_atomic(self.out, json.dumps(doc, indent=1))
            write_atomic(self.out.with_suffix(".md"), results.markdown(doc))

    def mix(self) -> dict:
        """The helpful+harmless train/validation file (written once; its composition goes into the JSON)."""
        with self.lock:
            comp = plan.write_mix(self.work / "data" / "mix.jsonl", self.args.data_root, self.plan)
            self.state["mixes"] = comp
        return comp

    def need(self, key: str, phase: str) -> None:
        """Stop with a clear message when an earlier phase's result is missing."""
        if not self.state.get(key):
            raise SystemExit(f"hh_two_axes: phase {phase} has not run (no {key} in {self.work / 'state.json'}); "
                             f"run --phases {phase} first")

    def n(self, part: str) -> int:
        return self.args.val_n if part == "validation" else self.args.n

    def suite(self, part: str) -> Path:
        """The suite YAML of ``part``: the plan's eval or validation rows of both axes with their judges, or
        ``heldout`` (the held-out helpful files, by the helpfulness judge)."""
        self.need("judges", "judges")
        judges, path = self.state["judges"], self.work / "suites" / f"{part}.yaml"
        if part == "heldout":
            return plan.write_heldout_suite(path, self.args.data_root, self.n(part), judges["helpful"]["run_dir"])
        return plan.write_suite(path, self.args.data_root, self.plan, part, self.n(part),
                                {axis: judges[axis]["run_dir"] for axis in plan.AXES})

    def evaluate(self, name: str, policy: list[str], part: str = "eval") -> dict | None:
        """`minialign eval --suite` of one policy, greedy, on ``part`` (``suite``); its eval.json (None if it
        failed, with a note)."""
        out = self.work / "evals" / part / name
        if not (out / "eval.json").is_file():
            self.minialign(f"eval-{part}-{name}", "eval", *policy, "--suite", str(self.suite(part)), "--samples", "0",
                           "--n", str(self.n(part)), "--out", str(out))
        ev = _read_json(out / "eval.json")
        if ev is None:
            with self.lock:
                self.state["notes"].append(f"{name}: its {part} eval failed (see logs/eval-{part}-{name}.log)")
        return ev

    def record_policy(self, name: str, policy: list[str], run: str) -> None:
        ev = self.evaluate(name, policy)
        if ev is None:
            return self.save()
        self.state["policies"][name] = {**results.policy_entry(ev, plan.TEST4_ROW), "run": run, "flags": policy}
        if not self.state.get("starting_model"):  # the eval's reference is the starting model
            start = {axis: results.reference_headline(ev, axis) for axis in plan.AXES}
            answer = results.answer_for_row(ev, "harmless", plan.TEST4_ROW, side="reference")
            start["test4_declined"] = None if answer is None else results.declines(answer)
            self.state["starting_model"] = start
        self.save()

    def adapter_policy(self, adapter: Path) -> list[str]:
        """Eval flags for a plain model + a PEFT adapter (TRL's results): the chat template said explicitly."""
        return ["--policy", self.args.model, "--adapter", str(adapter), "--tokenizer", self.tokenizer,
                "--chat-template", "off" if self.args.small else "on"]


def finished(run_dir: Path, marker: str = "summary.json") -> bool:
    return (run_dir / marker).is_file()


def fresh(run_dir: Path) -> None:
    """Remove an unfinished run folder of this study (a cut-off call's), so its command starts clean."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


def read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []
