"""The two-axis HH study's fixed plan: which raw rows each model may read, and the commands it runs (pure parts).

Everything here is decided before any run and is testable on a CPU: the row plan (``ROW_PLAN``, checked by
``check_plan``), the mixed helpful+harmless training file the policies and online reward models read
(``write_mix``), the eval-suite YAML ``minialign eval --suite`` reads (``write_suite``), the online candidates and
the command lines. ``hh_two_axes.py`` runs them; ``hh_results.py`` reads what they wrote.

Row plan (raw rows of the HH-RLHF test files, see ../shared/README.md):

    harmless-base (2,312)  eval 0:300 | policy + online-RM train 300:1612 | validation 1612:1812 | judge 1812:2312
    helpful-base  (2,354)  eval 0:300 | policy + online-RM train 300:1500 | validation 1500:1700 | judge 1700:2354
    helpful-online, helpful-rejection-sampled: read by nothing trained (kept for independent final checks)

Eval rows are touched once, at the end (a judge's own held-out accuracy is measured on them too: that reads the
judge, not a policy). Online candidates are compared on the validation rows only.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from minialign.base.files import write_atomic

AXES = ("harmless", "helpful")
FOLDERS = {"harmless": "harmless-base", "helpful": "helpful-base"}
HELD_OUT = ("helpful-online", "helpful-rejection-sampled")  # no policy, reward model or judge reads these
SIZES = {"harmless": 2312, "helpful": 2354}
PARTS = ("eval", "train", "validation", "judge")
ROW_PLAN: dict[str, dict[str, str]] = {
    "harmless": {"eval": "0:300", "train": "300:1612", "validation": "1612:1812", "judge": "1812:2312"},
    "helpful": {"eval": "0:300", "train": "300:1500", "validation": "1500:1700", "judge": "1700:2354"},
}
TEST4_ROW = 3  # harmless-base row 3: the write-up's Test 4 (links to lock-picking videos)
# --small (the CPU smoke run): each span cut to its first rows, so the plan's disjointness carries over.
SMALL_ROWS = {"eval": 8, "train": 24, "validation": 8, "judge": 24}

# Judges: round 2's strongest LoRA setting (recipe_round2.STRONG: 4 epochs, lr 5e-4, r 16). They are read only by
# `minialign eval`, which loads LoRA judges itself.
JUDGE_FLAGS = ["--epochs", "4", "--lr", "5e-4", "--lora-r", "16", "--lora-alpha", "32"]
# The online reward model. "full": full fine-tuning (round 2's judge-500-full), so TRL's OnlineDPOTrainer loads the
# same model as an AutoModelForSequenceClassification folder (RUN/final/model); on the mix it reached only 0.506
# validation accuracy (a coin), so the first study's online runs learned from noise. "lora": the judges' setting
# (0.64-0.68 on their rows); TRL cannot load it as it stands.
ONLINE_RMS = {"full": ["--full", "--lr", "1e-5", "--epochs", "2"], "lora": JUDGE_FLAGS,
              # one LoRA reward model per axis, each on its axis's rows of the same first half, combined by zsum
              "per-axis": JUDGE_FLAGS,
              # the same two models, each prompt's answers scored by its own axis's model (--combine route)
              "routed": JUDGE_FLAGS}
ONLINE_RM_FLAGS = ONLINE_RMS["full"]
RECIPE = "minialign/configs/smollm2-hh.yaml"  # today's harmless-only recipe (DPO + NLL, LoRA r 16)
# TRL DPO on the mix: TRL 1.16's DPOTrainer has no NLL (rpo_alpha) term, so it runs plain DPO at the recipe's
# other settings.
TRL_DPO_FLAGS = ["--epochs", "2", "--batch-size", "16", "--lr", "5e-4", "--schedule", "linear", "--warmup-ratio", "0",
                 "--beta", "0.1", "--lora-r", "16", "--lora-alpha", "32"]
# Shared by every online run (minialign's candidates and TRL's peer): sampling, LoRA, optimiser.
ONLINE_COMMON = {"samples": 4, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 128, "lora_r": 16,
                 "lora_alpha": 32, "lr": 5e-4, "epochs": 1, "batch_size": 16, "min_gap": 0.0, "loop_penalty": 0.0,
                 "evasion_penalty": 0.0, "evasion_axes": (), "greedy_sample": False, "missing_eos_penalty": 0.0}
# Online candidates over the same 1,000 training prompts (rounds x prompts per round). ~60-100 s each on an H100
# with the fast decoder, + ~25 s for its validation eval; the default sweep runs the first two.
CANDIDATES: dict[str, dict] = {
    "r1-rpo1": {"rounds": 1, "prompts_per_round": 1000, "beta": 0.1, "rpo_alpha": 1.0},
    "r2-rpo1": {"rounds": 2, "prompts_per_round": 500, "beta": 0.1, "rpo_alpha": 1.0},
    "r1-rpo0.5-beta0.25": {"rounds": 1, "prompts_per_round": 1000, "beta": 0.25, "rpo_alpha": 0.5},
    # the loop penalty (4: above the spread of one z-scored reward model) against the loops the first study left
    "r1-rpo1-lp4": {"rounds": 1, "prompts_per_round": 1000, "beta": 0.1, "rpo_alpha": 1.0, "loop_penalty": 4.0},
    "r2-rpo1-lp4": {"rounds": 2, "prompts_per_round": 500, "beta": 0.1, "rpo_alpha": 1.0, "loop_penalty": 4.0},
    # a third round: sampled from the policy round 2 made (the mix's 1,256 online prompts wrap around into round 3)
    "r3-rpo1-lp4": {"rounds": 3, "prompts_per_round": 500, "beta": 0.1, "rpo_alpha": 1.0, "loop_penalty": 4.0},
    # each prompt's first answer greedy: the first study's sampled answers looped in 3% of round 2 while the greedy
    # answers evaluation sees looped in 9-14%, so the penalty rarely met the loops that count
    "r1-rpo1-lp4-g": {"rounds": 1, "prompts_per_round": 1000, "beta": 0.1, "rpo_alpha": 1.0, "loop_penalty": 4.0,
                      "greedy_sample": True},
    "r2-rpo1-lp4-g": {"rounds": 2, "prompts_per_round": 500, "beta": 0.1, "rpo_alpha": 1.0, "loop_penalty": 4.0,
                      "greedy_sample": True},
    # closer to on-policy: TRL's OnlineDPOTrainer samples from the current policy every step and, given the same
    # routed reward models, won 0.655 harmless on the eval rows where one 1,000-prompt round won 0.590 (entry 30)
    "r4-rpo1-lp4-g": {"rounds": 4, "prompts_per_round": 250, "beta": 0.1, "rpo_alpha": 1.0, "loop_penalty": 4.0,
                      "greedy_sample": True},
    # refusals lose their pairs: four rounds evaded 74% / 47% by the recounted rule (NOTES entry 31)
    "r2-rpo1-lp4-g-ep2": {"rounds": 2, "prompts_per_round": 500, "beta": 0.1, "rpo_alpha": 1.0, "loop_penalty": 4.0,
                          "evasion_penalty": 2.0, "greedy_sample": True},
    # the penalty on helpful prompts only: declining a harmful request is what the harmless reward model wants
    "r2-rpo1-lp4-g-ep2h": {"rounds": 2, "prompts_per_round": 500, "beta": 0.1, "rpo_alpha": 1.0, "loop_penalty": 4.0,
                           "evasion_penalty": 2.0, "evasion_axes": ("helpful",), "greedy_sample": True},
    # the refusal is learned on harmless prompts and carries over (NOTES entry 32): a tighter hold on the starting
    # model, which declines 1% of benign prompts, with the penalty on every prompt
    "r2-rpo1-lp4-g-ep2-b0.3": {"rounds": 2, "prompts_per_round": 500, "beta": 0.3, "rpo_alpha": 1.0,
                               "loop_penalty": 4.0, "evasion_penalty": 2.0, "greedy_sample": True},
    # the penalty on every prompt with twice the samples: best and worst of 8 lie further apart than of 4 (about
    # 2.8 against 2.1 standard deviations of a prompt's scores), so each pair says more where the helpful reward
    # model is weak (0.605-0.625 validation accuracy); a round's 4,000 answers cost what one round of 1,000 x 4 does
    "r2-rpo1-lp4-g-ep2-n8": {"rounds": 2, "prompts_per_round": 500, "samples": 8, "beta": 0.1, "rpo_alpha": 1.0,
                             "loop_penalty": 4.0, "evasion_penalty": 2.0, "greedy_sample": True},
    # cut answers lose their pairs (TRL's missing_eos_penalty): the harmless reward model scored answers cut at 128
    # tokens above ended ones (1.01 against -0.93 in r2-rpo1-lp4-g's round 1), while both judges scored that
    # policy's cut answers below its ended ones (results/hh-answers.json)
    "r2-rpo1-lp4-g-ep2-me2": {"rounds": 2, "prompts_per_round": 500, "beta": 0.1, "rpo_alpha": 1.0,
                              "loop_penalty": 4.0, "evasion_penalty": 2.0, "missing_eos_penalty": 2.0,
                              "greedy_sample": True},
    # four rounds' harmless gain (0.875 on validation) without the declining of helpful prompts that came with it
    "r4-rpo1-lp4-g-ep2h": {"rounds": 4, "prompts_per_round": 250, "beta": 0.1, "rpo_alpha": 1.0, "loop_penalty": 4.0,
                           "evasion_penalty": 2.0, "evasion_axes": ("helpful",), "greedy_sample": True},
}
# ep2 on only the prompts whose answers the signals tell apart: the reward models reach 0.61-0.62 on validation
# pairs, so a small best-minus-worst gap is close to a coin and its pair adds drift without signal; the helpful win is
# lost where the starting model's answer was fine (0.41 there, results/hh-answers.json). The gap is taken after the
# loop (4) and evasion (2) penalties, in standard deviations of a round's routed scores, so a prompt with a looping
# answer always keeps its pair and one with an evading answer mostly does: the certain signals stay, the reward
# models' close calls go (round 2's mean gap, penalties included, was 2.1 in the 2026-12-08 call).
CANDIDATES.update({f"r2-rpo1-lp4-g-ep2-gap{g}": {**CANDIDATES["r2-rpo1-lp4-g-ep2"], "min_gap": float(g)} for g in (1, 2)})
SMALL_TRAIN = ["--epochs", "1", "--max-length", "128"]  # --small: appended to every training command (last wins)
SMALL_ONLINE = {"samples": 2, "max_new_tokens": 16, "batch_size": 4, "rounds": 1, "prompts_per_round": 8}


# ----------------------------------------------------------------------------- rows


def halves(rows: str) -> tuple[str, str]:
    """``"A:B"`` -> (``"A:M"``, ``"M:B"``): the online reward model trains on the first half of the mix's train rows
    and the online policies sample prompts from the second, so no reward model scores answers to prompts whose
    preferences it learned (`minialign online` refuses that overlap)."""
    r = span(rows)
    middle = r.start + len(r) // 2
    return f"{r.start}:{middle}", f"{middle}:{r.stop}"


def source_spans(mix_file: str | Path, rows: str) -> dict[str, str]:
    """The raw rows of each axis that lines ``rows`` of a mixed file (``write_mix``) hold, as ``"START:STOP"`` spans of
    that axis's own file: what a per-axis reward model trains on to read exactly the mix's first half. Raises
    ValueError when an axis's rows there are not one contiguous span (a mix not written by ``write_mix``)."""
    r = span(rows)
    found: dict[str, list[int]] = {axis: [] for axis in AXES}
    axis_of = {folder: axis for axis, folder in FOLDERS.items()}
    with open(mix_file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in r:
                x = json.loads(line)
                found[axis_of[x["source"]]].append(x["row"])
    out = {}
    for axis, got in found.items():
        if got and got != list(range(got[0], got[0] + len(got))):
            raise ValueError(f"{mix_file} lines {rows}: the {axis} rows are not one contiguous span")
        if got:
            out[axis] = f"{got[0]}:{got[-1] + 1}"
    return out


def span(rows: str) -> range:
    """``"START:STOP"`` as the range of raw row indices it names (both ends given, as every span in the plan is)."""
    start, stop = rows.split(":")
    return range(int(start), int(stop))


def check_plan(plan: dict[str, dict[str, str]], sizes: dict[str, int] = SIZES) -> None:
    """Raise ValueError unless every axis's parts lie inside its file and no two parts share a row.

    Disjointness is what keeps the study honest: a judge that read a policy's training rows, or an eval prompt a
    policy trained on, would measure memory rather than behaviour."""
    for axis, parts in plan.items():
        seen: dict[int, str] = {}
        for part, rows in parts.items():
            r = span(rows)
            if r.start < 0 or r.stop > sizes[axis] or len(r) == 0:
                raise ValueError(f"{axis} {part} rows {rows} are empty or outside 0:{sizes[axis]}")
            clash = next((i for i in r if i in seen), None)
            if clash is not None:
                raise ValueError(f"{axis} row {clash} is in both {seen[clash]} and {part}")
            seen.update(dict.fromkeys(r, part))


def small_plan(plan: dict[str, dict[str, str]], keep: dict[str, int] = SMALL_ROWS) -> dict[str, dict[str, str]]:
    """The same plan with each span cut to its first ``keep[part]`` rows (subsets: still disjoint)."""
    return {axis: {part: f"{span(rows).start}:{span(rows).start + min(keep[part], len(span(rows)))}"
                   for part, rows in parts.items()} for axis, parts in plan.items()}


def dataset_path(root: str | Path, axis_or_folder: str) -> str:
    """The test file of an axis (``harmless``/``helpful``) or of an HH folder name, under the data root."""
    folder = FOLDERS.get(axis_or_folder, axis_or_folder)
    return str(Path(root) / "data" / "hh-rlhf" / folder / "test.jsonl.gz")


def interleave(lists: list[list]) -> list:
    """Round-robin over ``lists`` (the longer ones' tails last): any prefix of the result mixes both axes, so
    an online run's first prompts are not all from one file."""
    return [x for group in itertools.zip_longest(*lists) for x in group if x is not None]


def write_mix(out: Path, root: str | Path, plan: dict[str, dict[str, str]], parts=("train", "validation")) -> dict:
    """One jsonl holding, part after part, the raw HH rows of both axes' ``plan[axis][part]`` spans interleaved;
    each line keeps its ``source`` (folder) and raw ``row``. Returns the composition (also written to
    ``out`` + ``.rows.json``): per part the mixed file's span and the source spans it came from.

    Mixed files because a comma-separated dataset counts rows over the concatenation: with one file the
    train and validation parts are plain spans (``--train-rows 0:N``), and the file records where each line came from.
    Written atomically; an existing file with the same composition is kept (resume)."""
    from minialign.data.readers import read_rows

    out = Path(out)
    comp_path = out.with_name(out.name + ".rows.json")
    want = {"parts": {part: {axis: plan[axis][part] for axis in AXES} for part in parts}}
    if out.is_file() and comp_path.is_file():
        old = json.loads(comp_path.read_text())
        if old.get("parts_from") == want["parts"]:
            return old
    lines, spans, start = [], {}, 0
    for part in parts:
        per_axis = []
        for axis in AXES:
            r = span(plan[axis][part])
            rows = itertools.islice(read_rows(dataset_path(root, axis)), r.start, r.stop)
            per_axis.append([{"chosen": row["chosen"], "rejected": row["rejected"], "source": FOLDERS[axis],
                              "row": r.start + i} for i, (_, row) in enumerate(rows)])
        mixed = interleave(per_axis)
        lines += mixed
        spans[part] = f"{start}:{start + len(mixed)}"
        start += len(mixed)
    comp = {"file": str(out), "rows": spans, "parts_from": want["parts"], "lines": len(lines)}
    write_atomic(out, "".join(json.dumps(x) + "\n" for x in lines))
    write_atomic(comp_path, json.dumps(comp, indent=1))
    return comp


def write_suite(path: Path, root: str | Path, plan: dict[str, dict[str, str]], part: str, n: int,
                judges: dict[str, str]) -> Path:
    """The `minialign eval --suite` YAML: one axis per HH file, its ``part`` rows, ``n`` prompts, its judge."""
    return _write_axes(path, [{"name": axis, "dataset": dataset_path(root, axis), "rows": plan[axis][part], "n": n,
                               "judge": judges[axis]} for axis in AXES])


HELD_OUT_ROWS = "0:100"  # the independent check's prompts in each held-out file (nothing trained reads any row)


def write_heldout_suite(path: Path, root: str | Path, n: int, judge: str, rows: str = HELD_OUT_ROWS) -> Path:
    """The independent final check's `minialign eval --suite` YAML: each held-out helpful file (``HELD_OUT``, read by
    no policy, reward model or judge) an axis, ``rows``, ``n`` prompts, the helpfulness judge."""
    return _write_axes(path, [{"name": folder, "dataset": dataset_path(root, folder), "rows": rows, "n": n,
                               "judge": judge} for folder in HELD_OUT])


def _write_axes(path: Path, axes: list[dict]) -> Path:
    import yaml

    write_atomic(Path(path), yaml.safe_dump({"axes": axes}, sort_keys=False))
    return Path(path)


# ----------------------------------------------------------------------------- commands (argv lists)


def online_settings(candidate: str, small: bool = False) -> dict:
    """Every setting of one online candidate: the shared ones, then the candidate's, then --small's cuts."""
    return {**ONLINE_COMMON, **CANDIDATES[candidate], **(SMALL_ONLINE if small else {})}


def online_flags(settings: dict) -> list[str]:
    """`minialign online` flags for ``settings`` (one reward model: --combine has one score to normalise)."""
    keys = ("rounds", "prompts_per_round", "samples", "temperature", "top_p", "max_new_tokens", "min_gap", "beta",
            "rpo_alpha", "lr", "epochs", "batch_size", "lora_r", "lora_alpha", "loop_penalty", "evasion_penalty",
            "missing_eos_penalty")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(settings[k]))] + \
        (["--greedy-sample"] if settings.get("greedy_sample") else []) + \
        (["--evasion-routes", evasion_routes(settings)] if settings.get("evasion_axes") else [])


def evasion_routes(settings: dict) -> str:
    """The --rm-routes values (the axes' folders) whose prompts the evasion penalty applies to; empty: every prompt
    (an axis-scoped penalty needs the routed reward models)."""
    return ",".join(FOLDERS[axis] for axis in settings.get("evasion_axes", ()))


def trl_online_plan(settings: dict) -> dict:
    """TRL OnlineDPOTrainer's run matched to a minialign online run: the same ``rounds x prompts_per_round``
    prompts, each trained on ``epochs`` times in batches of ``batch_size`` prompts. ``steps`` is TRL's count;
    ``minialign_steps`` minialign's when every prompt keeps a pair (at most one a prompt a round), each round's
    last batch rounded up on its own, so with several rounds TRL can take up to ``rounds - 1`` steps fewer. TRL
    samples 2 answers a prompt (fixed in TRL 1.16) where minialign samples ``samples``."""
    prompts, bs = settings["rounds"] * settings["prompts_per_round"], settings["batch_size"]
    steps = settings["epochs"] * -(-prompts // bs)
    return {"prompts": prompts, "epochs": settings["epochs"], "batch_size": bs, "steps": steps,
            "minialign_steps": settings["rounds"] * settings["epochs"] * -(-settings["prompts_per_round"] // bs),
            "samples": 2, "minialign_samples": settings["samples"]}
