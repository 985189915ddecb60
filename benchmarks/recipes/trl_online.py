#!/usr/bin/env python3
"""TRL's peer of `minialign online`: the script a TRL + PEFT user writes for on-policy DPO with a reward model.

    python benchmarks/recipes/trl_online.py --model M --dataset MIX.jsonl --train-rows 0:2512 --prompts 1000 \
        --reward-model RM_RUN/final/model --epochs 1 --batch-size 16 --beta 0.1 --lr 5e-4 --temperature 0.7 \
        --top-p 0.9 --max-new-tokens 128 --lora-r 16 --lora-alpha 32 --chat-template --out DIR
    # or minialign's routed reward models: --reward-models RM_A,RM_B --rm-routes harmless-base,helpful-base \
    #     [--route-field source] [--loop-penalty 4]

TRL 1.16 keeps ``OnlineDPOTrainer`` under ``trl.experimental.online_dpo`` (older versions: ``trl``). The run
matches minialign's: the prompts `minialign online` samples in its ``--rounds`` rounds of ``--prompts`` from the
same rows (picked by its own functions, in the chat template as minialign writes it); the same reward model (a
`minialign rm --full` run's ``final/model``, an AutoModelForSequenceClassification read at the last non-padding
token with pad = EOS, as minialign's judge reads it) or, with ``--reward-models``, `minialign online --combine
route`'s scoring as a TRL reward function (each answer scored by the `minialign rm` run its prompt's row routes it
to, standardised over the batch's answers routed to that model where minialign uses the round's, minus
``--loop-penalty`` for a looping answer, with minialign's own functions); temperature, top-p, max new tokens, beta,
learning rate, LoRA r/alpha on every linear layer, epochs and prompts a batch (so as many optimiser steps as
minialign's rounds give when every prompt keeps a pair: ``hh_plan.trl_online_plan``). What differs, and cannot be
set: TRL samples 2 answers a prompt (minialign 4), and its loss has no NLL term.

Writes ``DIR/adapter`` (PEFT; `minialign eval --policy M --adapter DIR/adapter` evaluates it) and, last,
``DIR/trl_online.json`` (steps, train_s, TRL's logged stats, versions): its presence means the run finished.
"""

from __future__ import annotations

import time

T_START = time.time()  # before the heavy imports: they are part of what a user waits for

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # minialign importable from a bare checkout
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="anything minialign.modeling.models.load_model takes")
    p.add_argument("--tokenizer", default="", help="default: the model's own (minialign's default tokenizer)")
    p.add_argument("--dataset", required=True, help="preference data; only the prompts are read")
    p.add_argument("--train-rows", default="", help="START:STOP over the raw rows")
    p.add_argument("--prompts", type=int, required=True, help="prompts a round, as `minialign online` picks them")
    p.add_argument("--rounds", type=int, default=1, help="minialign online's rounds whose prompts TRL trains on")
    p.add_argument("--reward-model", default="", help="an AutoModelForSequenceClassification folder")
    p.add_argument("--reward-models", default="", help="instead: `minialign rm` run folders, comma-separated, "
                   "each prompt's answers scored by the one its row routes it to (--rm-routes)")
    p.add_argument("--rm-routes", default="", help="with --reward-models: one --route-field value per model")
    p.add_argument("--route-field", default="source", help="the rows' field that names their reward model")
    p.add_argument("--loop-penalty", type=float, default=0.0, help="with --reward-models: subtracted from a "
                   "looping answer's standardised score (minialign online's --loop-penalty)")
    p.add_argument("--evasion-penalty", type=float, default=0.0, help="with --reward-models: subtracted from an "
                   "evading answer's standardised score (minialign online's --evasion-penalty)")
    p.add_argument("--evasion-routes", default="", help="--rm-routes values whose prompts --evasion-penalty applies "
                   "to (minialign online's --evasion-routes); empty: every prompt")
    p.add_argument("--missing-eos-penalty", type=float, default=0.0, help="with --reward-models: subtracted by TRL "
                   "(its missing_eos_penalty) from the standardised score of an answer without an EOS token, as "
                   "minialign online's flag (0: off)")
    p.add_argument("--reward-tokenizer", default="", help="default: final/tokenizer beside --reward-model")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="prompts a step (2 answers each)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-length", type=int, default=512, help="prompt + answer tokens the loss reads")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--chat-template", action="store_true", help="prompts in the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if bool(args.reward_model) == bool(args.reward_models):
        p.error("give either --reward-model (one sequence-classification folder) or --reward-models with --rm-routes")
    if args.reward_models and len(args.reward_models.split(",")) != len(args.rm_routes.split(",")):
        p.error("--rm-routes needs one value per --reward-models folder")
    if args.evasion_routes:  # read by minialign online's own rule, so both peers take the same values
        from minialign.base.errors import UserError
        from minialign.config.online import OnlineConfig

        cfg = OnlineConfig(reward_models=args.reward_models, combine="route", rm_routes=args.rm_routes,
                           evasion_penalty=args.evasion_penalty, evasion_routes=args.evasion_routes)
        try:
            args.evasion_routes = ",".join(cfg.routes()[i] for i in cfg.evasion_route_ids() or ())
        except UserError as exc:
            p.error(str(exc))
    for flag, value in (("--loop-penalty", args.loop_penalty), ("--evasion-penalty", args.evasion_penalty),
                        ("--missing-eos-penalty", args.missing_eos_penalty)):
        if not math.isfinite(value) or value < 0:
            p.error(f"{flag} must be a finite number >= 0 (got {value:g})")
        # TRL's own reward-model path has no place for minialign's penalties, and there TRL would subtract
        # --missing-eos-penalty from raw reward-model logits, not from the standardised scores minialign penalises
        if value and not args.reward_models:
            p.error(f"{flag} works with --reward-models (minialign's scoring as TRL's reward function) only")
    return args


def online_dpo_classes():
    """(OnlineDPOConfig, OnlineDPOTrainer) wherever the installed TRL keeps them."""
    try:
        from trl import OnlineDPOConfig, OnlineDPOTrainer
    except ImportError:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    return OnlineDPOConfig, OnlineDPOTrainer


def load_prompts(args: argparse.Namespace, tokenizer) -> dict[str, list[str]]:
    """The prompts `minialign online` samples in rounds 1..``--rounds`` (``--prompts`` a round) from the same rows
    (its own functions: the rows' usable pairs, each prompt once, the 10% it holds out left out, each round's seeded
    pick), as dataset columns: ``prompt`` (what the policy sees, chat template or not), ``raw_prompt`` (the HH
    text, what a minialign reward model is given) and, with ``--reward-models``, ``route`` (each row's
    ``--route-field``, checked as minialign checks it). TRL passes the columns other than ``prompt`` to a reward
    function."""
    from minialign.commands.online_inputs import load_prompts as online_prompts
    from minialign.commands.online_pairs import round_prompts
    from minialign.config.online import OnlineConfig

    routed = bool(args.reward_models)
    cfg = OnlineConfig(model=args.model, dataset=args.dataset, train_rows=args.train_rows, seed=args.seed,
                       chat_template=args.chat_template, reward_models=args.reward_models or args.reward_model,
                       combine="route" if routed else "zsum", rm_routes=args.rm_routes if routed else "",
                       route_field=args.route_field, rounds=args.rounds, prompts_per_round=args.prompts)
    pool = online_prompts(cfg, tokenizer)
    picked = [pool[i] for k in range(1, args.rounds + 1) for i in round_prompts(len(pool), args.prompts, k, args.seed)]
    columns = {"prompt": [p.text for p in picked], "raw_prompt": [p.raw for p in picked]}
    if routed:
        columns["route"] = [cfg.routes()[p.route] for p in picked]
    return columns


def routed_reward(run_dirs: list[str], routes: list[str], loop_penalty: float, device, strip: bool = True,
                  evasion_penalty: float = 0.0, evasion_routes: tuple[str, ...] = ()):
    """A TRL reward function doing `minialign online --combine route`'s scoring with minialign's own functions."""
    import torch

    from minialign.commands.online import score_answers
    from minialign.commands.online_pairs import combine_scores, in_scope, penalise
    from minialign.evaluation.evasion import evades
    from minialign.evaluation.judge import load_judge
    from minialign.evaluation.textmetrics import loops

    judges = [load_judge(d, device) for d in run_dirs]

    def routed_rm(prompts, completions, raw_prompt, route, **_):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        texts = [t.strip() for t in texts] if strip else texts  # as minialign online keeps chat answers
        model_of = torch.tensor([routes.index(r) for r in route])
        scores = score_answers(judges, raw_prompt, texts, model_of)
        combined = combine_scores(scores, [1.0] * len(judges), "route", model_of)
        combined = penalise(combined, [loops(t) for t in texts], loop_penalty)
        scoped = in_scope([evades(t) for t in texts], route, evasion_routes or None)
        return penalise(combined, scoped, evasion_penalty).tolist()

    return routed_rm


def reward_model(path: str, tokenizer_path: str):
    """The reward model and its tokenizer, padding with the model's own pad id (EOS): TRL copies the tokenizer's
    pad id into the model's config, and the score is read at the last token that is not padding."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from minialign.modeling.models import load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    tok = load_tokenizer(tokenizer_path or str(Path(path).parent / "tokenizer"))
    pad = model.config.pad_token_id
    if pad is not None and tok.pad_token_id != pad:
        tok.pad_token = tok.convert_ids_to_tokens(pad)
    return model, tok


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from peft import LoraConfig

    from minialign.modeling.models import default_tokenizer, load_model, load_tokenizer

    OnlineDPOConfig, OnlineDPOTrainer = online_dpo_classes()
    cuda = torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.tokenizer or default_tokenizer(args.model))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    columns = load_prompts(args, tok)
    train = datasets.Dataset.from_dict(columns)
    prompts = columns["prompt"]
    model = load_model(args.model, seed=args.seed, dtype=torch.float32)
    if args.reward_models:
        rm, rm_tok = routed_reward(args.reward_models.split(","), args.rm_routes.split(","), args.loop_penalty,
                                   "cuda" if cuda else "cpu", strip=args.chat_template,
                                   evasion_penalty=args.evasion_penalty,
                                   evasion_routes=tuple(filter(None, args.evasion_routes.split(",")))), None
    else:
        rm, rm_tok = reward_model(args.reward_model, args.reward_tokenizer)
    alpha = int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha
    lora = LoraConfig(r=args.lora_r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")
    config = OnlineDPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_train_epochs=args.epochs, learning_rate=args.lr, lr_scheduler_type="linear", weight_decay=0.0,
        max_grad_norm=1.0, bf16=cuda, fp16=False, use_cpu=not cuda, gradient_checkpointing=False, logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed, beta=[args.beta],
        max_new_tokens=args.max_new_tokens, max_length=args.max_length, temperature=args.temperature,
        top_p=args.top_p, top_k=0, missing_eos_penalty=args.missing_eos_penalty or None, dataloader_drop_last=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*max_new_tokens.*max_length.*")
        trainer = OnlineDPOTrainer(model=model, reward_funcs=rm, args=config, train_dataset=train,
                                   processing_class=tok, reward_processing_classes=rm_tok, peft_config=lora)
        t0 = time.perf_counter()
        trainer.train()
        if cuda:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
    t_done = time.time()
    trainer.model.save_pretrained(str(out / "adapter"))
    logs = [h for h in trainer.state.log_history if "loss" in h or "objective/scores" in h]
    row = {"runner": "trl-online", "model": args.model, "prompts": len(prompts), "steps": trainer.state.global_step,
           "epochs": args.epochs, "batch_size": args.batch_size, "samples_per_prompt": 2, "train_s": train_s,
           "t_start": T_START, "t_done": t_done, "wall_to_done_s": t_done - T_START, "log": logs,
           "settings": {k: getattr(args, k) for k in ("beta", "lr", "temperature", "top_p", "max_new_tokens",
                                                      "max_length", "lora_r", "lora_alpha", "chat_template", "seed",
                                                      "reward_model", "reward_models", "rm_routes", "route_field",
                                                      "loop_penalty", "evasion_penalty", "evasion_routes",
                                                      "missing_eos_penalty")},
           "trl_missing_eos_penalty": config.missing_eos_penalty,  # what TRL's trainer was given
           "device": torch.cuda.get_device_name() if cuda else "cpu", "adapter": str(out / "adapter"),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                        "peft": peft.__version__, "datasets": datasets.__version__}}
    tmp = out / "trl_online.json.tmp"
    tmp.write_text(json.dumps(row, indent=1), encoding="utf-8")
    tmp.replace(out / "trl_online.json")
    print(f"trl_online: {row['steps']} steps over {len(prompts)} prompts in {train_s:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
