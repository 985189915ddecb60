"""The configs of the commands that evaluate: `minialign run` (the whole experiment) and `minialign eval`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minialign.base.errors import UserError
from minialign.config.fields import check_choices, opt, parse_rows
from minialign.config.modelnames import model_help


@dataclass
class RunConfig:
    """`minialign run`: the reference experiment — LoRA table and benchmark, SFT, DPO, evaluation, report."""


    model: str = opt("EleutherAI/pythia-70m", model_help(), group="model")
    tokenizer: str = opt("", "tokenizer to use; empty: the model's own", group="model")
    dataset: str = opt("Anthropic/hh-rlhf", "preference data: hub id, local file(s) or glob, or demo", group="data")
    data_dir: str = opt("harmless-base", "sub-folder of a hub dataset", group="data")
    train_data: str = opt("", "local files for training; empty: the dataset's train split", group="data")
    train_rows: str = opt("", 'START:STOP over the raw training rows, e.g. "300:"; empty: all', group="data",
                          metavar="START:STOP")
    eval_data: str = opt("", "local files for evaluation; empty: the dataset's test split", group="data")
    eval_rows: str = opt("", "START:STOP over the raw held-out rows; empty: all", group="data", metavar="START:STOP")
    chat_template: bool = opt(False, "rewrite HH dialogues in the tokenizer's chat template (instruct models)",
                              group="data")
    out: str = opt("runs/run", "run folder (one sub-folder per training stage)", group="output", metavar="DIR")
    stages: list[str] = opt(["lora", "sft", "dpo", "eval", "report"], "stages to run (always in this order)", group="run",
                            choices=("lora", "sft", "dpo", "eval", "report"))
    ranks: list[int] = opt([2, 4, 8, 16], "LoRA ranks of the trainable-parameter table", group="lora", metavar="R")
    bench_steps: int = opt(30, "timed steps of the LoRA-vs-full speed measurement", group="run")
    bench_batch_size: int = opt(8, "batch size of the LoRA-vs-full speed measurement", group="run")
    bench_repeats: int = opt(3, "LoRA-vs-full benchmark: timed runs of each mode, taken in turns after one warm-up run "
                             "each; the table gives their median and spread", group="run")
    eval_pairs: int = opt(200, "held-out pairs scored by the eval stage", group="eval")
    samples: int = opt(5, "held-out prompts answered by the SFT and DPO models side by side in the report",
                       group="eval")
    max_new_tokens: int = opt(64, "tokens generated per sample", group="eval")
    seed: int = opt(0, "random seed of every stage", group="run")
    device: str = opt("auto", "where to run; auto: CUDA if visible, else CPU", group="run",
                      choices=("auto", "cpu", "cuda"))
    eval_prompts: int = opt(100, "held-out prompts the eval stage answers with the reference and the DPO policy "
                            "for the generation metrics (0: skip them; fewer when the held-out rows hold fewer, as "
                            "`minialign eval --n` does: the stage says so)", group="eval")
    eval_samples: int = opt(4, "sampled answers per prompt for the generation metrics, besides the greedy one",
                            group="eval")
    eval_temperature: float = opt(0.7, "sampling temperature of the generation metrics", group="eval")
    eval_top_p: float = opt(0.9, "nucleus sampling top-p of the generation metrics", group="eval")
    cache: bool = opt(True, "keep a converted model (GGUF) in the cache (see sft --help); --no-cache converts in "
                      "memory, writes nothing", group="model")
    judge: str = opt("", "a reward-model run folder (`minialign rm`) that scores the generation metrics' answers: "
                     "adds the policy's win rate over the reference (95% CI) to the report", group="eval",
                     metavar="RUN_DIR")
    eval_suite: str = opt("", "a suite YAML (as `minialign eval --suite`): the eval stage answers every axis's "
                          "prompts, each scored by its own judge, and the report has one table per axis (replaces "
                          "--judge; axes without n take eval_prompts)", group="eval", metavar="FILE.yaml")
    sft: dict = opt({}, "overrides of SFTConfig fields (YAML only)", group="run")
    dpo: dict = opt({}, "overrides of DPOConfig fields (YAML only)", group="run")



@dataclass
class EvalConfig:
    """`minialign eval`: generation-level comparison of a policy with its reference on held-out prompts."""


    policy: str = opt("", "the model to evaluate: a minialign sft/dpo (or run) folder, or a model name/path",
                      group="model", metavar="RUN_DIR|MODEL")
    adapter: str = opt("", "a PEFT-format LoRA adapter to load over --policy (a model name/path)", group="model",
                       metavar="DIR")
    reference: str = opt("", "what the policy is compared with (default: the model it started from): a run "
                         "folder or a model name/path", group="model", metavar="RUN_DIR|MODEL")
    tokenizer: str = opt("", "tokenizer (default: the policy run's, else the model's own)", group="model")
    dataset: str = opt("", "prompt source: hub id, local file(s), or demo (default: the policy run's held-out "
                       "data; for a plain model, Anthropic/hh-rlhf harmless-base test rows 0:300)", group="data")
    data_dir: str = opt("", "hub data_dir of --dataset (e.g. harmless-base)", group="data")
    split: str = opt("", "split of --dataset (default: the policy run's eval split, else test)", group="data")
    rows: str = opt("", "START:STOP over the raw rows of the prompt source (default: the run's eval rows)",
                    group="data")
    n: int = opt(100, "number of prompts: the first N usable ones of the rows, in order (fewer when the rows hold "
                 "fewer: the command says so)", group="eval")
    chat_template: str = opt("auto", "rewrite prompts in the tokenizer's chat template (auto: as the policy "
                             "run was trained)", group="eval", choices=("auto", "on", "off"))
    samples: int = opt(4, "sampled answers per prompt, besides the greedy one (0: greedy only)", group="eval")
    temperature: float = opt(0.7, "sampling temperature", group="eval")
    top_p: float = opt(0.9, "nucleus sampling: keep the smallest token set with this probability", group="eval")
    seed: int = opt(0, "seed of the sampled answers and of the win-rate bootstrap", group="eval")
    max_new_tokens: int = opt(128, "new tokens at most per answer", group="eval")
    batch_size: int = opt(0, "rows decoded at once (0: 128 on CUDA, 8 on CPU)", group="eval")
    judge: str = opt("", "a reward-model run folder (`minialign rm`) that scores answers: adds win rates",
                     group="eval", metavar="RUN_DIR")
    judge_batch_size: int = opt(32, "answers the judge scores at once", group="eval")
    suite: str = opt("", "a YAML file of prompt sets (axes), each with its own rows, --n and judge: one table per "
                     "axis (docs/evaluation.md, 'Two axes'); replaces --dataset/--rows/--judge", group="eval",
                     metavar="FILE.yaml")
    answers: str = opt("", "score the answers saved by an earlier `minialign eval` (its --out folder) or `minialign "
                       "run` (its folder) with --judge instead of generating: same answers, another judge",
                       group="eval", metavar="EVAL_OR_RUN_DIR")
    show: int = opt(8, "prompts whose answers eval.md shows side by side (the terminal shows the metric tables; "
                    "eval.json holds every answer)", group="eval")
    device: str = opt("auto", "where to run", group="eval", choices=("auto", "cpu", "cuda"))
    out: str = opt("", "output folder for eval.json and eval.md (default: <policy run>/eval, else runs/eval)",
                   group="output")
    overwrite: bool = opt(False, "replace the answers already in --out (and delete the folders re-scored from them "
                          "with --answers); without it an existing eval.json is never replaced", group="output")


    def validate(self) -> None:
        checks = [
            (bool(self.policy) or bool(self.answers),
             "--policy is required (a minialign sft/dpo run folder, or a model name/path)"),
            (not self.answers or bool(self.judge) or bool(self.suite),
             "--answers re-scores saved answers, so it needs --judge (or --suite for the answers of a suite eval)"),
            (not (self.suite and self.judge), "--suite names each axis's judge; drop --judge (or --suite)"),
            (not (self.suite and not self.answers and (self.dataset or self.rows or self.data_dir or self.split)),
             "--suite names each axis's dataset and rows; drop --dataset, --data-dir, --split and --rows"),
            (not (self.answers and (self.policy or self.adapter or self.reference or self.dataset or self.rows)),
             "--answers reuses the policy, reference and prompts of the eval it names; drop --policy, --adapter, "
             "--reference, --dataset and --rows (or drop --answers to generate new answers)"),
            (self.n >= 1, "n must be >= 1"),
            (self.samples >= 0, "samples must be >= 0 (0: greedy only)"),
            (self.samples == 0 or self.temperature > 0, "temperature must be > 0 when sampling"),
            (self.samples == 0 or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.batch_size >= 0, "batch_size must be >= 0 (0: automatic)"),
            (self.judge_batch_size >= 1, "judge_batch_size must be >= 1"),
            (self.show >= 0, "show must be >= 0"),
            (not (self.adapter and is_run_dir(self.policy)), "--adapter goes with a model name/path, not a run "
             "folder (a run folder brings its own final adapter)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"Invalid configuration: {message}.")
        check_choices(self)  # chat_template, device
        parse_rows(self.rows or None, "--rows")  # a malformed or empty span fails before any model loads



def is_run_dir(path: str) -> bool:
    return (Path(path) / "config.yaml").is_file() or (Path(path) / "run.yaml").is_file()
