"""`minialign ...`: parse, call one function, print. Every bad input exits 2 with a one-paragraph error.

Starting is quick and quiet: this module and what it imports (cli_help, config, presets, modelnames) never import
torch or transformers, so `--help` answers at once; a command imports them when it runs, inside ``main``, so a
Ctrl-C at any moment ends with one line and exit code 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minialign import __version__
from minialign.base.errors import UserError
from minialign.commands.tools import BENCH_VARIANTS, cmd_bench, cmd_data, cmd_generate, cmd_lora_params
from minialign.config.cli_help import Parser, add_config_flags
from minialign.config.evaluation import EvalConfig, RunConfig
from minialign.config.modelnames import model_help
from minialign.config.online import OnlineConfig
from minialign.config.presets import build, flag_values, load_yaml, preset
from minialign.config.schema import DPOConfig, RMConfig, SFTConfig

MODEL_HELP = model_help()
USAGE = "%(prog)s [--demo | --config FILE | --resume RUN_DIR] [--overwrite] [options]"
EXAMPLES = {
    "sft": ("Fine-tune a model on the chosen responses of preference pairs (LoRA unless --full); the run folder "
            "gets config.yaml, metrics.jsonl, checkpoints and final/.",
            "examples:\n  minialign sft --demo\n"
            "  minialign sft --model smollm2-135m-instruct --chat-template --dataset my.jsonl "
            "--max-length 1024 --out runs/my-sft"),
    "dpo": ("Direct preference optimisation: raise the likelihood of chosen over rejected responses against a frozen "
            "reference (the starting model).",
            "examples:\n  minialign dpo --demo\n  minialign dpo --sft runs/my-sft --dataset my.jsonl --beta 0.1 "
            "--loss-type sigmoid --out runs/my-dpo"),
    "rm": ("Train a Bradley-Terry reward model (a judge for `minialign eval`): a scalar head read at each sequence's "
           "last token, loss -log sigmoid(r_chosen - r_rejected); saved as a transformers sequence-classification "
           "model (--full) or a PEFT SEQ_CLS adapter with its score head.",
           "examples:\n  minialign rm --demo\n  minialign rm --model smollm2-135m-instruct --chat-template --dataset "
           "judge-pairs.jsonl --eval-data held-out.jsonl --out runs/judge"),
    "online": ("On-policy iterative DPO: each round samples --samples answers per prompt from the current policy, "
               "scores them with --reward-models, trains DPO on each prompt's best-vs-worst pair (reference: the "
               "starting model), and the next round samples from the updated policy.",
               "examples:\n  minialign rm --demo --train-rows 100: --out runs/rm-demo\n"
               "  minialign online --demo --reward-models runs/rm-demo\n"
               "  minialign online --config configs/online.yaml --reward-models runs/judge --out runs/online"),
    "run": ("The whole reference experiment as resumable stages: LoRA parameter table and speed, SFT, DPO, held-out "
            "evaluation, report.",
            "examples:\n  minialign run --demo --out runs/demo\n  minialign run --config my-run.yaml --stages sft dpo"),
}


def _train_parser(sub, name: str, cls, help: str) -> None:
    description, epilog = EXAMPLES[name]
    p = sub.add_parser(name, help=help, description=description, epilog=epilog, usage=USAGE)
    _run_options(p, f"{name}-demo")
    p.add_argument("--tensorboard", dest="report_to", action="store_const", const="tensorboard",
                   default=argparse.SUPPRESS, help="deprecated: use --report-to tensorboard")
    add_config_flags(p, cls)


def _run_options(p, demo: str) -> None:
    """The options every training command shares, outside its config: where the config comes from."""
    p.add_argument("--config", metavar="FILE", help="YAML preset (see minialign/configs/); flags override it")
    p.add_argument("--demo", action="store_true", help=f"start from the {demo} preset: tiny model + built-in demo "
                   "data, runs offline on a CPU")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from where it stopped (its config.yaml and "
                   "last complete checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minialign", description="Align small causal language models: LoRA, SFT and DPO, with "
                    "evaluation and reports. `minialign COMMAND --help` lists a command's options.")
    parser.add_argument("--version", action="version", version=f"minialign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("lora-params", help="rank-sweep table of LoRA trainable parameters")
    p.add_argument("--model", default="pythia-70m", help=MODEL_HELP)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16], metavar="R", help="LoRA ranks to count")
    p.add_argument("--targets", default="all-linear", help="all-linear or comma-separated module names")
    p.add_argument("--json", action="store_true", help="print the table as JSON")

    p = sub.add_parser("data", help="validate and summarise a preference-data source")
    p.add_argument("source", help="hub id, local .jsonl/.jsonl.gz/.json/.parquet file(s) or glob, or demo")
    p.add_argument("--split", default="train", help="split to read")
    p.add_argument("--data-dir", default=None, help="sub-folder of a hub dataset (HH-RLHF: harmless-base, ...)")
    p.add_argument("--rows", default=None, help="START:STOP over raw rows, e.g. 300: or 0:300")
    p.add_argument("--tokenizer", default=None, help="give one for token-length statistics")
    p.add_argument("--max-length", type=int, default=512, help="tokens of prompt + response kept (truncation counts)")
    p.add_argument("--max-prompt-length", type=int, default=0, help="prompt tokens kept; 0: half of --max-length")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    _train_parser(sub, "sft", SFTConfig, "supervised fine-tuning on the chosen responses")
    _train_parser(sub, "dpo", DPOConfig, "direct preference optimisation against a frozen reference")
    _rm_parser(sub)
    _train_parser(sub, "online", OnlineConfig, "on-policy iterative DPO: sample from the policy, score with reward "
                  "models, train on best-vs-worst pairs, repeat")

    description, epilog = EXAMPLES["run"]
    p = sub.add_parser("run", help="the whole experiment: LoRA table + benchmark, SFT, DPO, evaluation, report",
                       description=description, epilog=epilog, usage=USAGE)
    _run_options(p, "run-demo")
    add_config_flags(p, RunConfig)

    p = sub.add_parser("generate", help="generate responses from a model (optionally with an adapter)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", default=None, help="a PEFT-format adapter folder (e.g. RUN_DIR/final/adapter)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to use; default: the model's own")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several prompts")
    p.add_argument("--hh", action="store_true", help="wrap each prompt as '\\n\\nHuman: ...\\n\\nAssistant:'")
    p.add_argument("--chat-template", action="store_true", help="put each prompt in the tokenizer's chat template "
                   "(as a user message, or an HH dialogue's turns), as training with --chat-template did")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt at most")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest token set of this "
                   "probability mass (with --sample; 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (with --sample; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse a GGUF model's converted weights from the cache (--no-cache: convert in memory)")

    p = sub.add_parser("bench", help="training speed and peak memory of minialign on this machine "
                       "(the side-by-side run with TRL is benchmarks/bench_gpu.py)")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny model, demo data")
    p.add_argument("--model", default="pythia-70m", help=MODEL_HELP)
    p.add_argument("--tokenizer", default="../shared/tokenizers/gpt-neox-20b/tokenizer.json", help="tokenizer file or id")
    p.add_argument("--data", default="../shared/data/hh-rlhf/harmless-base/test.jsonl.gz", help="preference data")
    p.add_argument("--tasks", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"], help="tasks to measure")
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"], help="LoRA and/or full "
                   "fine-tuning")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], metavar="B", help="batch sizes to measure")
    p.add_argument("--variant", default="compile", choices=list(BENCH_VARIANTS),
                   help="compile: dynamic shapes; cudagraphs: rows padded to 512, reduce-overhead; graphs: padding-free "
                        "rows rounded to 512 tokens, each step one CUDA graph (--padding-free --compile --cuda-graphs)")
    p.add_argument("--compile-scope", default="blocks", choices=["blocks", "model"],
                   help="compiled variants: one compiled block serves every block, or the whole transformer as one graph")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 3 warm-up steps)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")

    p = sub.add_parser("report", help="rebuild report.md / report.html from a finished run folder")
    p.add_argument("run_dir", help="the folder of a `minialign run`")
    _eval_parser(sub)
    return parser


def _eval_parser(sub) -> None:
    help = ("compare a policy's answers with its reference's on held-out prompts: loops, distinct-2, EOS share, "
            "length, and with --judge a reward model's scores and the policy's win rate")
    p = sub.add_parser("eval", help=help, description=help)
    p.add_argument("--config", help="YAML file of eval settings; flags override it")
    add_config_flags(p, EvalConfig)


def cmd_eval(args) -> int:
    from minialign.commands.evalcmd import run_eval

    run_eval(_config(args, EvalConfig))
    return 0


def _check_resume_alone(args) -> None:
    """--resume continues a run from its own config.yaml: --demo and --config would start another, so they are
    alternatives to it (as the usage line shows), never additions."""
    others = [flag for flag, given in (("--demo", args.demo), ("--config", args.config)) if given]
    if args.resume and others:
        raise UserError(f"--resume and {' and '.join(others)} are alternatives: --resume {args.resume} continues that "
                        "run with the configuration saved in its folder, while --demo / --config start a new run. Drop "
                        f"{' and '.join(others)} to continue the run, or drop --resume (and choose a new --out, or add "
                        "--overwrite) to start over.")


def _train_config(args, cls, kind: str):
    _check_resume_alone(args)
    if args.resume:
        from minialign.base import dist
        from minialign.commands.resume import resume_config

        cfg = resume_config(Path(args.resume), cls, kind, _resume_flags(args, cls))
        # How a run is launched is not part of it: it may resume on another number of processes.
        cfg.dist = getattr(args, "dist", cfg.dist if dist.launched_world() > 1 else "auto")
        return cfg
    return _config(args, cls, f"{kind}-demo")


def _resume_flags(args, cls) -> dict:
    """What a --resume asks to change in the run's own config: --config FILE's fields, then the typed flags."""
    if args.demo or args.overwrite:
        raise UserError(f"--resume {args.resume} continues a run from its own config.yaml; "
                        f"--{'demo' if args.demo else 'overwrite'} starts a new one. Drop one of the two.")
    return {**(load_yaml(args.config, cls) if args.config else {}), **flag_values(args, cls)}


def _config(args, cls, demo: str | None = None):
    """``cls`` from its defaults, then the ``demo`` preset (with --demo), then --config FILE, then the typed flags."""
    layers = []
    if demo and args.demo:
        layers.append(load_yaml(preset(demo), cls))
    if args.config:
        layers.append(load_yaml(args.config, cls))
    return build(cls, *layers, flag_values(args, cls))


def cmd_train(args, kind: str) -> int:
    from minialign.base import dist
    from minialign.commands import recipes
    from minialign.training.timing import done_line

    cls = SFTConfig if kind == "sft" else DPOConfig
    cfg = _train_config(args, cls, kind)
    run = recipes.sft if kind == "sft" else recipes.dpo
    with dist.session(cfg.dist, cfg.device):  # under torchrun: join the process group, leave it at the end
        run_dir = run(cfg, resume=bool(args.resume), overwrite=args.overwrite)
        if dist.rank() == 0:
            print(done_line(kind, run_dir))
    return 0


def _rm_parser(sub) -> None:
    _train_parser(sub, "rm", RMConfig, "a Bradley-Terry reward model (judge) on the preference pairs: a scalar head on "
                  "the last token, LoRA or full")


def cmd_rm(args) -> int:
    from minialign.base import dist
    from minialign.commands import reward
    from minialign.training.timing import done_line

    cfg = _train_config(args, RMConfig, "rm")
    with dist.session(cfg.dist, cfg.device):
        run_dir = reward.rm(cfg, resume=bool(args.resume), overwrite=args.overwrite)
        if dist.rank() == 0:
            summary = json.loads((run_dir / "summary.json").read_text())
            accuracy = summary.get("eval", {}).get("eval/accuracy")
            if accuracy is not None:
                print(f"minialign rm: held-out pair accuracy {accuracy:.3f}")
            print(done_line("rm", run_dir))
    return 0


def cmd_online(args) -> int:
    from minialign.commands.online import online

    cfg = _train_config(args, OnlineConfig, "online")
    online(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    return 0


def cmd_report(args) -> int:
    from minialign.reporting.report import write_report

    paths = write_report(Path(args.run_dir))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_run(args) -> int:
    from minialign.base import dist
    from minialign.commands import experiment

    if dist.launched_world() > 1:
        raise UserError("`minialign run` runs in one process; under torchrun, launch `minialign sft` and `minialign dpo`.")
    _check_resume_alone(args)
    if args.resume:
        cfg = experiment.resume_config(Path(args.resume), _resume_flags(args, RunConfig))
    else:
        cfg = _config(args, RunConfig, "run-demo")
    experiment.run(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    return 0


# What to lower when a command runs out of GPU memory: only flags the command has.
OUT_OF_MEMORY = {
    "eval": "Lower --batch-size (rows decoded at once; 0 means 128 on CUDA) or --judge-batch-size (answers the judge "
            "scores at once), or shorten --max-new-tokens.",
    "generate": "Give fewer or shorter prompts, or shorten --max-new-tokens.",
    "online": "Lower --gen-batch-size (rows decoded at once) or --rm-batch-size while sampling and scoring, "
              "--batch-size (with a higher --grad-accum) while training, or --max-length.",
    "run": "Lower the stages' batch sizes in the --config YAML (sft: {batch_size: ...}, dpo: {batch_size: ...}) or "
           "--bench-batch-size, or shorten --max-new-tokens.",
    "bench": "Give smaller --batch-sizes.",
    "train": "Lower --batch-size (and raise --grad-accum to keep the global batch), lower --max-length, or use LoRA "
             "instead of --full.",
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. A Ctrl-C anywhere in here, torch's import included, ends with one line."""
    try:
        return _main(argv)
    except KeyboardInterrupt as exc:
        print(f"minialign: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "lora-params": cmd_lora_params,
        "data": cmd_data,
        "sft": lambda a: cmd_train(a, "sft"),
        "dpo": lambda a: cmd_train(a, "dpo"),
        "rm": cmd_rm,
        "online": cmd_online,
        "run": cmd_run,
        "generate": cmd_generate,
        "report": cmd_report,
        "bench": cmd_bench,
        "eval": cmd_eval,
    }
    try:
        return commands[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            batch = getattr(args, "batch_size", None)
            where = f" at --batch-size {batch}" if batch else ""
            what = OUT_OF_MEMORY.get(args.command, OUT_OF_MEMORY["train"])
            print(f"error: the GPU ran out of memory{where}. {what}", file=sys.stderr)
            return 2
        raise
