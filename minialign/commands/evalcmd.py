"""`minialign eval`: resolve the policy, its reference, the prompts and the judge from a config, compare the
two models' answers (``geneval.compare``), write ``eval.json`` and ``eval.md``, print the tables.

Defaults are chosen so that the honest comparison is the easy one: the reference is the model the policy
started from, the prompts are the policy run's own held-out rows, and rows it trained on are refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minialign.base.errors import UserError
from minialign.commands.evalsides import (
    check_judge,
    judged_compare,
    load_models,
    policy_training,
    prompt_rows,
    read_answers,
    rescored,
    run_folder,
    run_tokenizer,
    use_chat,
    write_outputs,
)
from minialign.commands.folders import check_eval_out
from minialign.config.evaluation import EvalConfig
from minialign.evaluation.evalrows import (
    check_not_trained_on,
    load_prompts,
)
from minialign.evaluation.geneval import Decoding
from minialign.reporting.generation import tables_text


def run_eval(cfg: EvalConfig) -> Path:
    """`minialign eval`: every input checked before the first answer is generated."""
    from minialign.base.devices import resolve_device
    from minialign.modeling.models import load_tokenizer

    cfg.validate()
    if cfg.answers:
        return rescore(cfg)
    found = run_folder(cfg.policy, "--policy")
    out = Path(cfg.out or (found[0] / "eval" if found else "runs/eval"))
    check_eval_out(out, overwrite=cfg.overwrite)  # before any model is loaded
    if cfg.suite:
        from minialign.commands.evalsuite import run_suite_eval

        return run_suite_eval(cfg, out)
    device = resolve_device(cfg.device)
    tokenizer_label = cfg.tokenizer or run_tokenizer(cfg.policy)
    tokenizer = load_tokenizer(tokenizer_label)
    if cfg.judge:
        check_judge(cfg.judge, "--judge", tokenizer, tokenizer_label)
    policy, reference, ref_label = load_models(cfg, tokenizer)
    rows = prompt_rows(cfg, policy)
    chat = use_chat(cfg, policy)
    prompts = load_prompts(rows, cfg.n, chat_tokenizer=tokenizer if chat else None)
    trained = policy_training(policy)
    check_not_trained_on(prompts, rows, trained)
    print(f"minialign eval: policy {policy.label}; reference {ref_label}; {len(prompts)} prompts from {rows.label()}")
    decoding = Decoding(cfg.max_new_tokens, cfg.samples, cfg.temperature, cfg.top_p, cfg.seed, cfg.batch_size or None)
    results = judged_compare(policy.model, reference, tokenizer, prompts, rows, trained, decoding, device,
                             judge_path=cfg.judge, judge_batch_size=cfg.judge_batch_size)
    results = {"policy": policy.label, "reference": ref_label, "chat_template": chat, "tokenizer": tokenizer_label,
               "config": dataclasses.asdict(cfg), **results}
    write_outputs(out, results, cfg.show)
    print(tables_text(results))
    spent = ", ".join(f"{mode} {sec:.1f} s" for mode, sec in results["generation_s"].items())
    print(f"\nminialign eval: generation for {len(prompts)} prompts x 2 models: {spent}")
    print(f"minialign eval: wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return out


def rescore(cfg: EvalConfig) -> Path:
    """`minialign eval --answers DIR --judge J`: the saved answers scored by another judge, without a policy,
    a reference or any generation. Everything but the judge's numbers is what the earlier eval recorded."""
    path, saved = read_answers(cfg.answers)
    if "axes" in saved or cfg.suite:
        from minialign.commands.evalsuite import rescore_suite

        return rescore_suite(cfg, path, saved)
    out = Path(cfg.out or path.parent / f"judged-{Path(cfg.judge).resolve().name}")
    if out.resolve() == path.parent.resolve():
        raise UserError(f"--out {out} is the folder of the answers being re-scored: its eval.json would be "
                        "replaced. Give another --out.")
    check_eval_out(out, overwrite=cfg.overwrite)
    results = rescored(cfg, path, saved, cfg.judge, "--judge")
    write_outputs(out, results, cfg.show)
    print(tables_text(results))
    print(f"minialign eval: wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return out


