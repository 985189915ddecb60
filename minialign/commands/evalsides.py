"""What `minialign eval` compares and how it is judged: the policy and reference sides (run folders or models),
the rows each trained on, checked judges, saved answers, and the outputs (eval.json, eval.md). `evalcmd` (one
prompt set) and `evalsuite` (several axes) both build on these."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from minialign.base.errors import UserError
from minialign.base.files import write_atomic
from minialign.commands.folders import replace_eval_out
from minialign.config.evaluation import EvalConfig
from minialign.config.schema import DPOConfig, SFTConfig, TrainConfig
from minialign.evaluation.evalrows import RowSet, heldout_rows, judge_rows, online_reward_rows, train_rows
from minialign.evaluation.geneval import Decoding, EvalPrompt, compare
from minialign.modeling import adapters
from minialign.reporting.generation import generation_blocks

HH_DEFAULT = RowSet("Anthropic/hh-rlhf", "test", "harmless-base", "0:300")



@dataclass
class Side:
    """A loaded model and where it came from."""


    model: torch.nn.Module
    label: str
    run_dir: Path | None = None
    kind: str | None = None  # sft | dpo for a run folder
    cfg: TrainConfig | None = None
    adapter: bool = False  # LoRA on top: its adapters switched off give the starting model
    tokenizer: str = ""  # the tokenizer this side brings (run folders save theirs)



def run_folder(path: str, flag: str) -> tuple[Path, str] | None:
    """(folder, "sft" | "dpo") when ``path`` is a minialign training run (a `minialign run` folder means its
    DPO stage); None for anything else. A reward-model run is refused: it scores text, it does not write it."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    kind_file = folder / "kind"
    if kind_file.is_file():
        kind = kind_file.read_text(encoding="utf-8").strip()
        if kind == "rm":
            raise UserError(
                f"{flag} {path} is a reward-model run (`minialign rm`; its 'kind' file says rm): it scores answers, "
                f"it cannot write them. {flag} needs a causal LM (an sft/dpo run folder or a model); give the reward "
                "model as --judge instead.")
        if kind not in ("sft", "dpo", "online"):
            raise UserError(f"{flag} {path} is a minialign '{kind}' run; {flag} needs an sft, dpo or online run or "
                            "a model.")
        return folder, kind
    if (folder / "run.yaml").is_file():
        if not (folder / "dpo" / "kind").is_file():
            raise UserError(f"{flag} {path} is a `minialign run` folder whose DPO stage has not run; resume it first.")
        return run_folder(str(folder / "dpo"), flag)
    return None  # every sft/dpo run folder has a 'kind' file (common.prepare_run_dir writes it with config.yaml)



def start_model(cfg: TrainConfig, kind: str, tokenizer) -> torch.nn.Module:
    """The model a run started from: the base for SFT; the base with its SFT result merged in for DPO."""
    from minialign.commands import common, recipes


    if kind in ("dpo", "online"):  # an online run starts (and keeps its reference) where DPO would
        return recipes.dpo_start_model(cfg, tokenizer)
    return common.load_base(cfg, tokenizer)



def run_config(folder: Path, kind: str) -> TrainConfig:
    from minialign.config.presets import load_run_config


    return load_run_config(folder, DPOConfig if kind in ("dpo", "online") else SFTConfig)



def folder_tokenizer(folder: Path, cfg: TrainConfig) -> str:
    """The tokenizer a run brings: its saved final/tokenizer, else the one its config names."""
    from minialign.modeling.models import default_tokenizer


    saved = folder / "final" / "tokenizer"
    return str(saved) if saved.is_dir() else cfg.tokenizer or default_tokenizer(cfg.model)



def run_tokenizer(spec: str) -> str:
    """The tokenizer a run or model brings: a run's (``folder_tokenizer``), else its model's own."""
    from minialign.modeling.models import default_tokenizer


    found = run_folder(spec, "--policy")
    if found is None:
        return default_tokenizer(spec)
    folder, kind = found
    return folder_tokenizer(folder, run_config(folder, kind))



def load_side(spec: str, adapter: str, flag: str, tokenizer) -> Side:
    """The final model of a run folder (its adapter over its starting model, or final/model), or a model
    name/path with an optional adapter."""
    from minialign.modeling.models import default_tokenizer, load_model


    found = run_folder(spec, flag)
    if found is None:
        model = load_model(spec)
        if adapter:
            adapters.load_adapter(model, adapter)
        return Side(model, spec + (f" + adapter {adapter}" if adapter else ""), adapter=bool(adapter),
                    tokenizer=default_tokenizer(spec))
    folder, kind = found
    cfg = run_config(folder, kind)
    final = folder / "final"
    if (final / "adapter").is_dir():
        model = adapters.load_adapter(start_model(cfg, kind, tokenizer), final / "adapter")
        has_adapter = True
    elif (final / "model").is_dir():
        model, has_adapter = load_model(str(final / "model")), False
    else:
        raise UserError(f"{flag} {spec}: the {kind} run has no final/adapter or final/model: did it finish? "
                        f"Resume it with `minialign {kind} --resume {folder}`.")
    return Side(model, f"{kind} run {folder}", folder, kind, cfg, has_adapter, folder_tokenizer(folder, cfg))



def default_reference(policy: Side, tokenizer) -> tuple[torch.nn.Module | None, str]:
    """What the policy started from: its adapters switched off (None), or a separately loaded start model."""
    if policy.adapter:
        return None, f"the policy's starting model ({policy.label} with its LoRA adapters off)"
    if policy.cfg is not None:
        what = "its SFT model" if policy.kind == "dpo" else f"its base model {policy.cfg.model}"
        return start_model(policy.cfg, policy.kind, tokenizer), f"the policy's starting model ({what})"
    raise UserError(f"--policy {policy.label} is a plain model without an adapter, so it has no starting model to "
                    "compare with: give --reference MODEL_OR_RUN_DIR (or --adapter with the base model as --policy).")



def same_vocab(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()



def config_training(cfg: TrainConfig | None, kind: str) -> list[tuple[str, RowSet]]:
    """Every row set a policy learned from: its own run's, and for DPO from an SFT run, that run's too."""
    if cfg is None:
        return []
    trained = [(f"the policy's {kind} run", train_rows(cfg))]
    sft = getattr(cfg, "sft", "")
    if sft and (Path(sft) / "config.yaml").is_file():
        trained.append(("the policy's SFT run", train_rows(run_config(Path(sft), "sft"))))
    return trained



def policy_training(policy: Side) -> list[tuple[str, RowSet]]:
    """Every row set the policy learned from: its runs' (``config_training``) and its online reward models'."""
    return config_training(policy.cfg, policy.kind or "") + online_reward_rows(policy.run_dir)



def prompt_rows(cfg: EvalConfig, policy: Side) -> RowSet:
    """--dataset/--rows when given; else the policy run's held-out rows; else HH harmless-base test 0:300."""
    if cfg.dataset:
        return RowSet(cfg.dataset, cfg.split or "test", cfg.data_dir, cfg.rows)
    if policy.cfg is None:
        return dataclasses.replace(HH_DEFAULT, split=cfg.split or HH_DEFAULT.split,
                                   data_dir=cfg.data_dir or HH_DEFAULT.data_dir, rows=cfg.rows or HH_DEFAULT.rows)
    rows = heldout_rows(policy.cfg)
    if cfg.rows or cfg.split or cfg.data_dir:
        rows = RowSet(rows.dataset, cfg.split or rows.split, cfg.data_dir or rows.data_dir, cfg.rows or rows.rows)
    return rows



def check_judge(path: str, flag: str, tokenizer, tokenizer_label: str) -> None:
    """Refuse, before any model is loaded, a judge that is no finished reward-model run or that reads text with
    another vocabulary than the policy (its scores would be of other token ids). Only the judge's saved
    tokenizer is read, so this is cheap enough to run first."""
    from minialign.modeling.models import load_tokenizer


    kind_file = Path(path) / "kind"
    kind = kind_file.read_text(encoding="utf-8").strip() if kind_file.is_file() else None
    if kind != "rm":
        raise UserError(f"{flag} {path} is not a reward-model run folder (its 'kind' file should say rm; it says "
                        f"{kind!r}). Train one with `minialign rm` and pass its run folder.")
    saved = Path(path) / "final" / "tokenizer"
    if not saved.is_dir():
        raise UserError(f"{flag} {path}: the reward-model run has no final/tokenizer, so it has not finished. "
                        f"Resume it with `minialign rm --resume {path}`, then pass it again.")
    judge_tokenizer = load_tokenizer(str(saved))
    if not same_vocab(judge_tokenizer, tokenizer):
        config = Path(path) / "config.yaml"
        base = (yaml.safe_load(config.read_text()) or {}).get("model", "?") if config.is_file() else "?"
        raise UserError(
            f"{flag} {path} reads text with a different tokenizer than the policy: the judge's (trained from {base}) "
            f"is {saved} ({len(judge_tokenizer.get_vocab())} tokens), the policy's is {tokenizer_label} "
            f"({len(tokenizer.get_vocab())} tokens), and their vocabularies differ. A judge must be trained from "
            "the policy's model family: train `minialign rm` on the same base model (or --tokenizer).")



def load_checked_judge(path: str, device, prompts, rows: RowSet | None, trained) -> tuple[Any, dict]:
    """The judge (``check_judge`` has let it through), and what to print beside its win rates (held-out
    accuracy, the rows it and the policy trained on, overlaps). ``rows`` or ``trained`` None: not known (answers
    saved before eval.json recorded them), and the overlap they decide is None rather than a guess."""
    from minialign.evaluation.judge import load_judge


    judge = load_judge(path, device=device)  # cache left on (EvalConfig has no such setting): one load a process
    info = judge.info
    jrows = judge_rows(judge.config)
    context = {
        "run_dir": str(info.get("run_dir", path)), "model": info.get("model"),
        "heldout_accuracy": info.get("heldout_accuracy"), "n_train": info.get("n_train"),
        "judge_rows": jrows.label(), "judge_eval": f"{info.get('eval_data') or info.get('dataset')} rows "
                                                   f"{info.get('eval_rows') or 'all'}",
        "policy_rows": ("not recorded with the saved answers" if trained is None else
                        "; ".join(r.label() for _, r in trained) or "unknown (not a minialign run)"),
        "overlap_policy": None if trained is None else any(jrows.overlaps(r) for _, r in trained),
        "overlap_prompts": None if rows is None else (jrows.key == rows.key
                                                      and bool(jrows.members([p.row for p in prompts]))),
    }
    return judge, context



def judged_compare(policy, reference, tokenizer, prompts: list[EvalPrompt], rows: RowSet,
                   trained: list[tuple[str, RowSet]], decoding: Decoding, device, *, judge_path: str = "",
                   judge_batch_size: int = 32) -> dict:
    """``geneval.compare`` on ``device``, with the judge at ``judge_path`` (if any) and its context: the one path
    behind `minialign eval` and the generation metrics of `minialign run`."""
    judge, context = None, None
    if judge_path:
        judge, context = load_checked_judge(judge_path, device, prompts, rows, trained)
    policy.to(device)
    if reference is not None:
        reference.to(device)
    results = compare(policy, reference, tokenizer, prompts, decoding, judge=judge, judge_batch_size=judge_batch_size,
                      judge_context=context)
    # what `--answers` needs to judge these answers again later: where the prompts and the policy's rows came from
    return {"prompt_source": rows.label(), "prompt_rows": rows.to_dict(),
            "policy_trained": [{"what": what, **r.to_dict()} for what, r in trained], **results}



def load_models(cfg: EvalConfig, tokenizer) -> tuple[Side, torch.nn.Module | None, str]:
    """The policy, its reference (None: the policy with its adapters off) and the reference's label."""
    from minialign.modeling.models import load_tokenizer


    policy = load_side(cfg.policy, cfg.adapter, "--policy", tokenizer)
    if not cfg.reference:
        return policy, *default_reference(policy, tokenizer)
    ref_side = load_side(cfg.reference, "", "--reference", tokenizer)
    if not same_vocab(load_tokenizer(ref_side.tokenizer), tokenizer):
        raise UserError(f"--reference {cfg.reference} uses another tokenizer than the policy; compare models of "
                        "one family (same vocabulary).")
    return policy, ref_side.model, ref_side.label



def use_chat(cfg: EvalConfig, policy: Side) -> bool:
    """--chat-template on, or auto and the policy run trained with its tokenizer's chat template."""
    return cfg.chat_template == "on" or (cfg.chat_template == "auto" and bool(policy.cfg and policy.cfg.chat_template))



def read_answers(spec: str) -> tuple[Path, dict]:
    """The eval.json of an earlier `minialign eval` (its folder or the file), or the generation metrics of a
    `minialign run` folder, checked for what re-scoring needs."""
    folder = Path(spec)
    if folder.is_dir() and not (folder / "eval.json").is_file() and (folder / "run.yaml").is_file():
        return run_answers(folder)
    path = folder / "eval.json" if folder.is_dir() else folder
    if not path.is_file():
        raise UserError(f"--answers {spec}: no eval.json there. Give the --out folder of an earlier `minialign eval` "
                        "(it holds eval.json with every answer) or a `minialign run` folder.")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--answers {path} is not valid JSON ({e}); it is not an eval.json written by "
                        "`minialign eval`. Generate the answers again.") from e
    if isinstance(results, dict) and isinstance(results.get("axes"), dict) and results["axes"]:
        return path, results  # a suite eval: evalsuite.rescore_suite checks each axis
    missing = [k for k in ("prompts", "decoding", "policy", "reference") if k not in results]
    if missing or not results["prompts"]:
        raise UserError(f"--answers {path} has no {', '.join(missing) or 'answers (its prompt list is empty)'}: it "
                        "is not an eval.json written by `minialign eval`. Generate the answers again.")
    return path, results



def run_answers(folder: Path) -> tuple[Path, dict]:
    """A `minialign run` folder's answers: results.json's "generation" (its eval stage), labelled as eval.json is."""
    path = folder / "results.json"
    generation = (json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}).get("generation")
    if not generation:
        raise UserError(f"--answers {folder}: the run has no generation metrics in {path} (its eval stage has not "
                        "run, or ran with eval_prompts 0). Resume the run, or give an eval folder.")
    return path, {"policy": f"dpo run {folder / 'dpo'}", "reference": "the policy's starting model", **generation}



def saved_tokenizer(cfg: EvalConfig, path: Path, saved: dict) -> str:
    """The tokenizer the saved answers were generated with (--tokenizer overrides), for the judge's vocabulary check."""
    from minialign.modeling.models import default_tokenizer


    label = cfg.tokenizer or saved.get("tokenizer") or saved.get("config", {}).get("tokenizer") or ""
    if not label:
        raise UserError(f"--answers {path} does not record the policy's tokenizer (it predates that field): pass "
                        "--tokenizer, the tokenizer the policy generated with, so the judge's vocabulary can be checked.")
    return default_tokenizer(label)  # a model name stands for its tokenizer, as with --policy



def rescored(cfg: EvalConfig, path: Path, saved: dict, judge_path: str, flag: str) -> dict:
    """One saved eval's answers (a one-axis eval.json, or one axis of a suite's) scored by ``judge_path`` (none:
    metrics only): the eval.json of the re-scoring."""
    from minialign.base.devices import resolve_device
    from minialign.evaluation.geneval import saved_answers, summarize
    from minialign.modeling.models import load_tokenizer


    prompts, answers, decoding = saved_answers(saved)
    judge, context = None, None
    if judge_path:
        tokenizer_label = saved_tokenizer(cfg, path, saved)
        check_judge(judge_path, flag, load_tokenizer(tokenizer_label), tokenizer_label)
        rows = RowSet.from_dict(saved["prompt_rows"]) if "prompt_rows" in saved else None
        trained = ([(t["what"], RowSet.from_dict(t)) for t in saved["policy_trained"]]
                   if "policy_trained" in saved else None)
        judge, context = load_checked_judge(judge_path, resolve_device(cfg.device), prompts, rows, trained)
        print(f"minialign eval: re-scoring {path} ({len(prompts)} prompts) with the judge {judge_path}")
    results = summarize(prompts, answers, decoding, judge=judge, judge_batch_size=cfg.judge_batch_size,
                        judge_context=context)
    keep = ("policy", "reference", "prompt_source", "chat_template", "tokenizer", "prompt_rows", "policy_trained",
            "generation_s")
    return {**{k: saved[k] for k in keep if k in saved}, "answers_from": str(path),
            "generation_config": saved.get("config"), "config": dataclasses.asdict(cfg), **results}



def write_outputs(out: Path, results: dict, show: int) -> None:
    """eval.json (every number and answer) and eval.md (tables and the first ``show`` prompts), atomically."""
    from minialign.reporting.render import Note, Section, render_markdown


    prompts = (f"suite {results['suite']['file']} ({len(results['axes'])} axes)" if "axes" in results
               else results["prompt_source"])
    head = Note(f"Policy: {results['policy']}. Reference: {results['reference']}. Prompts: {prompts}"
                f"{' (chat template)' if results['chat_template'] else ''}."
                + (f" Answers generated earlier ({results['answers_from']}), scored here by another judge."
                   if results.get("answers_from") else ""))
    if "axes" in results:
        from minialign.reporting.suite import suite_sections


        sections = suite_sections(results, show)
        sections[0].blocks.insert(0, head)
    else:
        sections = [Section("Generation", [head, *generation_blocks(results, show)])]
    markdown = render_markdown("minialign eval", sections)
    replace_eval_out(out)  # --overwrite: what the answers replaced leave behind (check_eval_out refused it otherwise)
    write_atomic(out / "eval.json", json.dumps(results, indent=1).encode())
    write_atomic(out / "eval.md", markdown.encode())
