"""One dataclass config per command: its fields (with their ``--help`` text) and its validation.

Turning YAML presets and typed flags into one of these lives in ``minialign.presets``; this module reads no files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from minialign.errors import UserError
from minialign.modelnames import model_help

# Flag groups, in the order `--help` lists them.
GROUPS = ("model", "data", "lora", "training", "speed", "memory", "distributed", "dpo", "rm", "eval", "run", "output")


# Choices shared with other modules, kept here so that `--help` needs no torch import (tests check they agree).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")  # minialign.losses.LOSS_TYPES
TRACKERS = ("none", "tensorboard", "trackio", "wandb", "mlflow")  # minialign.trackers


def opt(default, help: str, *, group: str, choices: tuple | None = None, metavar: str | None = None,
        multiple: bool = False):
    """A config field with its one-line ``--help`` text, flag group and allowed values.

    The description lives here, beside the field, and nowhere else: ``cli_help.add_config_flags`` builds the CLI
    from it, so the help cannot drift from the config. Lists get a ``default_factory``. ``multiple``: a string field that
    holds a comma-separated list of ``choices`` (as transformers' ``report_to`` does).
    """
    meta = {"help": help, "group": group, "choices": choices, "metavar": metavar, "multiple": multiple}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_choices(cfg) -> None:
    """Every field declared with ``choices`` holds one of them (YAML presets and resumed runs skip argparse)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if not choices:
            continue
        value = getattr(cfg, f.name)
        if f.metadata.get("multiple"):
            values = split_list(value)
        else:
            values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in choices]
        if bad:
            raise UserError(f"Invalid configuration: {f.name} (--{f.name.replace('_', '-')}) must be "
                            f"{'a comma-separated list of' if f.metadata.get('multiple') else 'one of'} "
                            f"{', '.join(map(str, choices))}; got {', '.join(map(repr, bad))}.")


def split_list(value: str) -> list[str]:
    """``"tensorboard, wandb"`` -> ``["tensorboard", "wandb"]`` (empty parts dropped)."""
    return [part.strip() for part in str(value).split(",") if part.strip()]


def prompt_length(max_length: int, max_prompt_length: int) -> int:
    """``max_prompt_length``, where 0 follows ``max_length`` (half of it); an explicit value must leave the
    response at least one token."""
    if max_prompt_length == 0:
        return max(1, max_length // 2)
    if not 0 < max_prompt_length < max_length:
        raise UserError(
            f"Invalid configuration: --max-prompt-length {max_prompt_length} must be at least 1 and smaller than "
            f"--max-length {max_length}, so that every response keeps at least one token. Lower --max-prompt-length, "
            f"raise --max-length, or drop --max-prompt-length (0) to keep half of --max-length ({max_length // 2})."
        )
    return max_prompt_length


@dataclass
class TrainConfig:
    """Everything SFT and DPO share: model, data, adapter, optimisation, run folder."""

    model: str = opt("EleutherAI/pythia-70m", model_help(), group="model")
    tokenizer: str = opt("", "tokenizer to use; empty: the model's own", group="model")
    dataset: str = opt("Anthropic/hh-rlhf", "preference data: hub id, local file(s) or glob (.jsonl[.gz], .json, "
                       ".parquet), or demo", group="data", metavar="SOURCE")
    data_dir: str = opt("harmless-base", "sub-folder of a hub dataset (HH-RLHF: harmless-base, helpful-base, ...)",
                        group="data")
    train_split: str = opt("train", "split used for training", group="data")
    train_rows: str = opt("", 'START:STOP over the raw training rows, e.g. "300:"; empty: all', group="data",
                          metavar="START:STOP")
    eval_data: str = opt("", "held-out data source; empty: the same source as training", group="data")
    eval_split: str = opt("test", "split used for held-out evaluation", group="data")
    eval_rows: str = opt("", "START:STOP over the raw held-out rows; empty: all", group="data", metavar="START:STOP")
    limit: int = opt(0, "cap on training pairs (0: all)", group="data")
    eval_limit: int = opt(200, "cap on held-out pairs used for evaluation during training", group="data")
    max_length: int = opt(512, "tokens of prompt + response kept per example (longer ones are cut)", group="data")
    max_prompt_length: int = opt(0, "prompt tokens kept (its end); 0: half of --max-length", group="data")
    chat_template: bool = opt(False, "rewrite HH dialogues in the tokenizer's chat template (instruct models)",
                              group="data")
    full: bool = opt(False, "full fine-tuning instead of LoRA", group="lora")
    lora_r: int = opt(8, "LoRA rank", group="lora")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: updates are scaled by alpha / r", group="lora")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input", group="lora")
    lora_targets: str = opt("all-linear", "modules that get LoRA: all-linear or comma-separated module names",
                            group="lora", metavar="MODULES")
    use_rslora: bool = opt(False, "rank-stabilised LoRA: scale by alpha / sqrt(r)", group="lora")
    epochs: int = opt(1, "passes over the training data", group="training")
    max_steps: int = opt(0, "stop after this many optimizer steps; 0: run the epochs", group="training")
    batch_size: int = opt(8, "examples (DPO: pairs) per micro-batch, per device", group="training")
    grad_accum: int = opt(1, "micro-batches summed into one optimizer step", group="training")
    lr: float = opt(2e-4, "peak learning rate", group="training")
    weight_decay: float = opt(0.0, "AdamW weight decay", group="training")
    warmup_ratio: float = opt(0.05, "fraction of the steps spent warming the learning rate up", group="training")
    schedule: str = opt("cosine", "learning-rate schedule after warm-up", group="training",
                        choices=("cosine", "linear", "constant"))
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this; 0: no clipping", group="training")
    seed: int = opt(0, "random seed: LoRA initialisation, data order, dropout", group="training")
    log_every: int = opt(10, "read metrics back from the device every N steps (each step still gets its metrics row)",
                         group="output")
    eval_every: int = opt(0, "evaluate on held-out data every N steps; 0: only at the end", group="run")
    save_every: int = opt(0, "checkpoint every N steps and at the end (0: none, except when stopped by a signal)",
                          group="run")
    keep_last: int = opt(2, "checkpoints kept (older ones are deleted)", group="run")
    out: str = opt("", "run folder", group="output", metavar="DIR")
    device: str = opt("auto", "where to train; auto: CUDA if visible, else CPU", group="run",
                      choices=("auto", "cpu", "cuda"))
    packing: bool = opt(False, "SFT only: fixed-length rows of several documents", group="speed")
    padding_free: bool = opt(False, "each batch as one row of its sequences back to back (document-masked "
                             "attention): no FLOPs on padding", group="speed")
    fast: str = opt("auto", "the fast GPU setting in one switch: padding-free batches with shapes planned up front, "
                    "varlen attention and whole-step CUDA graphs where the run allows them; auto: on with CUDA; off "
                    "leaves each flag as set", group="speed", choices=("auto", "on", "off"))
    attention: str = opt("auto", "attention of packed / padding-free rows; auto: varlen on CUDA, a dense mask on CPU",
                         group="speed", choices=("auto", "varlen", "sdpa", "flex"))
    compile: bool = opt(False, "torch.compile the transformer", group="speed")
    compile_mode: str = opt("default", 'torch.compile mode; "reduce-overhead" adds CUDA graphs (pad to max_length)',
                            group="speed", metavar="MODE")
    compile_scope: str = opt("blocks", "blocks: one compiled block serves every block (fast to compile); model: the "
                             "whole transformer as one graph", group="speed", choices=("blocks", "model"))
    pad_to_multiple_of: int = opt(8, "round row lengths up to a multiple of this: tensor-core friendly, fewer shapes "
                                  "and recompiles",
                                  group="speed")
    pad_targets_to_multiple_of: int = opt(64, "round the output projection's rows up too (0: off)", group="speed")
    shape_buckets: int = opt(4, "padding-free runs plan at most this many row lengths before the first step, so "
                             "captures and compilations are counted up front (0: no plan; one shape per length)",
                             group="speed")
    target_buckets: int = opt(1, "target counts planned per row length (a capture costs more than padding the "
                              "output projection's rows of a whole epoch)", group="speed")
    base_dtype: str = opt("auto", "dtype of the model's own weights: the frozen base under LoRA (auto: bf16 on CUDA, "
                          "else float32) or the trained weights with --full (auto: float32; bfloat16: stochastically "
                          "rounded AdamW, 12 instead of 16 bytes a parameter, one process only)", group="memory",
                          choices=("auto", "float32", "bfloat16"))
    grad_checkpointing: bool = opt(False, "recompute activations in backward: less memory, more compute",
                                   group="memory")
    optim_in_backward: bool = opt(False, "step AdamW on each parameter as soon as its gradient is complete and free "
                                  "it: no whole-model gradient (one process; needs --max-grad-norm 0, --grad-accum 1)",
                                  group="memory")
    cuda_graphs: bool = opt(False, "replay each training step (forward, backward, clipping, AdamW) as one CUDA graph "
                            "per batch shape: no host cost per step (CUDA, one process, --grad-accum 1; round shapes "
                            "coarsely: --padding-free --pad-to-multiple-of 512)", group="speed")
    loss_chunk_size: int = opt(0, "rows of the output projection computed at once (0: 128 MiB chunks); lower it to "
                               "cut peak memory", group="memory")
    report_to: str = opt("none", "send metrics to these trackers too (comma-separated), under TRL's names; each "
                         "needs its package (pip install 'minialign[NAME]')", group="output", choices=TRACKERS,
                         multiple=True)
    merge: bool = opt(False, "also save merged weights (LoRA folded into the model) at the end", group="output")
    dist: str = opt("auto", "how several torchrun processes share the work; auto: DDP under torchrun",
                    group="distributed", choices=("auto", "none", "ddp", "fsdp"))
    cache: bool = opt(True, "keep a converted model (GGUF) in $MINIALIGN_CACHE, else $XDG_CACHE_HOME/minialign or "
                      "~/.cache/minialign, so later starts skip the conversion; --no-cache converts in memory, writes "
                      "nothing", group="model")

    def __post_init__(self) -> None:
        # Resolved at once, so every reader (recipes, `minialign run`'s stages, tests) sees the length used and
        # config.yaml records it; validate() reports an explicit bad combination.
        if self.max_prompt_length == 0:
            self.max_prompt_length = prompt_length(self.max_length, 0)

    def validate(self) -> None:
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.epochs >= 1 or self.max_steps > 0, "epochs must be >= 1 (or set max_steps)"),
            (self.max_steps >= 0, "max_steps must be >= 0"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.pad_to_multiple_of >= 0, "pad_to_multiple_of must be >= 0"),
            (self.pad_targets_to_multiple_of >= 0, "pad_targets_to_multiple_of must be >= 0 (0: off)"),
            (not (self.padding_free and self.packing), "padding_free and packing exclude each other: packed rows "
             "are already free of padding; choose one"),
            (self.shape_buckets >= 0, "shape_buckets must be >= 0 (0: no shape plan)"),
            (self.target_buckets >= 1, "target_buckets must be >= 1"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0: no clipping)"),
            (self.loss_chunk_size >= 0, "loss_chunk_size must be >= 0 (0: automatic)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"Invalid configuration: {message}.")
        check_choices(self)
        self.max_prompt_length = prompt_length(self.max_length, self.max_prompt_length)
        from minialign.data.sources import parse_rows
        from minialign.dist import launched_world
        from minialign.trackers import check_available

        parse_rows(self.train_rows or None, "--train-rows")  # a malformed or empty span fails before anything loads
        parse_rows(self.eval_rows or None, "--eval-rows")
        check_available(self.report_to)  # a missing package fails before the run folder is written
        if self.optim_in_backward:
            self.check_optim_in_backward(launched_world())
        if self.full and self.base_dtype == "bfloat16":
            self.check_bf16_weights(launched_world())
        if self.cuda_graphs:
            self.check_cuda_graphs(launched_world())

    def apply_fast(self, device_type: str, world: int) -> None:
        """Turn on the fast setting (``fast``: on, or auto with CUDA): padding-free batches (unless packing), and
        whole-step CUDA graphs where the run allows them (one process, no accumulation, ...). Flags already on stay."""
        if self.fast == "off" or (self.fast == "auto" and device_type != "cuda"):
            return
        if not self.packing:
            self.padding_free = True
        graphs_ok = (self.grad_accum == 1 and world == 1 and not self.optim_in_backward
                     and self.compile_mode != "reduce-overhead" and (self.compile or not self.grad_checkpointing))
        if graphs_ok and device_type == "cuda":
            self.cuda_graphs = True

    def check_cuda_graphs(self, world: int) -> None:
        """What a captured step cannot hold: several micro-batches, collectives, hooks that free gradients, nested graphs."""
        problems = [
            (self.grad_accum != 1, f"grad_accum 1 (got {self.grad_accum}): one graph replays one micro-batch; raise "
             "--batch-size instead"),
            (world > 1, f"one process (this is one of {world} torchrun processes): gradients are reduced across ranks "
             "outside the graph; drop --cuda-graphs under torchrun"),
            (self.optim_in_backward, "no --optim-in-backward: its hooks free each gradient, the graph needs them"),
            (self.compile_mode == "reduce-overhead", "compile_mode default: 'reduce-overhead' records its own CUDA "
             "graphs, which cannot sit inside this one"),
            # Only the compiled path was run on a GPU: eager checkpointing reads the CUDA RNG state in every
            # recomputation, which a capture may not allow.
            (self.grad_checkpointing and not self.compile, "--compile when --grad-checkpointing is on (the "
             "combination measured on a GPU); add --compile or drop --grad-checkpointing"),
        ]
        for bad, need in problems:
            if bad:
                raise UserError(f"Invalid configuration: cuda_graphs needs {need}.")

    def check_bf16_weights(self, world: int) -> None:
        """What full fine-tuning in bf16 (``StochasticAdamW``) has not been built for."""
        if self.optim_in_backward:
            raise UserError("Invalid configuration: --full with base_dtype bfloat16 steps its own AdamW (stochastic "
                            "rounding), which does not run inside backward: drop --optim-in-backward, or use "
                            "--base-dtype float32 with it.")
        if world > 1:
            raise UserError(f"Invalid configuration: --full with base_dtype bfloat16 runs in one process only (this is "
                            f"one of {world} torchrun processes): its rounding has not been checked on sharded "
                            "weights. Use --base-dtype float32 under torchrun.")

    def check_optim_in_backward(self, world: int) -> None:
        """What ``optim_in_backward`` cannot do: each parameter is updated, and its gradient freed, inside backward."""
        if self.max_grad_norm != 0:
            raise UserError(
                f"Invalid configuration: optim_in_backward needs max_grad_norm 0 (got {self.max_grad_norm:g}): clipping "
                "scales every gradient by the norm of the whole gradient, which is known only after every parameter has "
                "been updated. Add --max-grad-norm 0, or drop --optim-in-backward."
            )
        if self.grad_accum != 1:
            raise UserError(
                f"Invalid configuration: optim_in_backward needs grad_accum 1 (got {self.grad_accum}): each gradient is "
                "applied and freed as soon as it is complete, so it cannot be summed over micro-batches. Raise "
                "--batch-size instead (--grad-checkpointing makes room for it), or drop --optim-in-backward."
            )
        if world > 1:
            raise UserError(
                f"Invalid configuration: optim_in_backward runs in one process only, but this is one of {world} "
                "torchrun processes: DDP and FSDP reduce gradients across ranks after the parameters would already "
                "have been updated. Drop --optim-in-backward, or launch a single process without torchrun."
            )


@dataclass
class SFTConfig(TrainConfig):
    out: str = opt("runs/sft", "run folder", group="output", metavar="DIR")


@dataclass
class DPOConfig(TrainConfig):
    sft: str = opt("", "an SFT run folder to start from (its final adapter is merged into the base)", group="dpo",
                   metavar="RUN_DIR")
    adapter: str = opt("", "or a PEFT-format adapter for --model, merged before training", group="dpo", metavar="DIR")
    beta: float = opt(0.1, "strength of the pull towards the reference (the KL coefficient)", group="dpo")
    loss_type: str = opt("sigmoid", "DPO loss; simpo needs no reference model", group="dpo", choices=LOSS_TYPES)
    label_smoothing: float = opt(0.0, "assumed fraction of flipped preference labels (sigmoid and robust losses)",
                                 group="dpo")
    rpo_alpha: float = opt(0.0, "RPO: add this x the chosen response's mean token NLL to each pair's loss (0: plain "
                           "DPO); per response, where TRL's rpo_alpha averages over a batch's chosen tokens",
                           group="dpo")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin", group="dpo")
    precompute_ref: bool = opt(False, "score every pair with the reference once before training, then drop the "
                               "reference model", group="dpo")
    share_prompt: bool = opt(True, "padding-free batches compute each prompt once and branch both responses off it "
                             "(exact; HH prompts are long, so ~1.5x fewer positions); --no-share-prompt lays pairs "
                             "out as SFT does", group="dpo")
    lr: float = opt(5e-5, "peak learning rate", group="training")
    out: str = opt("runs/dpo", "run folder", group="output", metavar="DIR")

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise UserError("Invalid configuration: beta must be > 0 (try 0.1).")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError("Invalid configuration: label_smoothing must be in [0, 0.5).")
        if self.rpo_alpha < 0:
            raise UserError(f"Invalid configuration: rpo_alpha must be >= 0 (got {self.rpo_alpha}; try 1.0, or 0 "
                            "for plain DPO).")
        if self.sft and self.adapter:
            raise UserError("Give either --sft RUN_DIR or --adapter DIR, not both.")


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
    answers: str = opt("", "score the answers saved by an earlier `minialign eval` (its --out folder) or `minialign "
                       "run` (its folder) with --judge instead of generating: same answers, another judge",
                       group="eval", metavar="EVAL_OR_RUN_DIR")
    show: int = opt(8, "prompts whose answers eval.md shows side by side (the terminal shows the metric tables; "
                    "eval.json holds every answer)", group="eval")
    device: str = opt("auto", "where to run", group="eval", choices=("auto", "cpu", "cuda"))
    out: str = opt("", "output folder for eval.json and eval.md (default: <policy run>/eval, else runs/eval)",
                   group="output")

    def validate(self) -> None:
        checks = [
            (bool(self.policy) or bool(self.answers),
             "--policy is required (a minialign sft/dpo run folder, or a model name/path)"),
            (not self.answers or bool(self.judge), "--answers re-scores saved answers, so it needs --judge"),
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
            (not (self.adapter and _is_run_dir(self.policy)), "--adapter goes with a model name/path, not a run "
             "folder (a run folder brings its own final adapter)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"Invalid configuration: {message}.")
        check_choices(self)  # chat_template, device
        from minialign.data.sources import parse_rows

        parse_rows(self.rows or None, "--rows")  # a malformed or empty span fails before any model loads


def _is_run_dir(path: str) -> bool:
    return (Path(path) / "config.yaml").is_file() or (Path(path) / "run.yaml").is_file()


@dataclass
class RMConfig(TrainConfig):
    """`minialign rm`: a Bradley-Terry reward model (scalar head on the last token) on the same preference data."""

    center_rewards_coefficient: float = opt(
        0.0, "weight of (r_chosen + r_rejected)^2 in the loss, keeping rewards centred on 0 (TRL's "
        "center_rewards_coefficient; 0: off)", group="rm")
    share_prompt: bool = opt(True, "padding-free batches compute each prompt once, both responses branching off it "
                             "(exact; HH prompts are long)", group="speed")
    lr: float = opt(1e-4, "peak learning rate", group="training")
    out: str = opt("runs/rm", "run folder", group="output")

    def validate(self) -> None:
        super().validate()
        if self.center_rewards_coefficient < 0:
            raise UserError("Invalid configuration: center_rewards_coefficient must be >= 0 (TRL suggests 0.01; 0: off).")
        if self.packing:
            raise UserError("Invalid configuration: packing is for SFT; reward models train on pairs. Use --padding-free "
                            "(or --fast on) for batches without padding.")
