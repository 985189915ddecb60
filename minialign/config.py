"""One dataclass config per command, YAML presets, and flag overrides.

Precedence, lowest first: the dataclass defaults, a YAML preset (``--config FILE`` or ``--demo``), then the
flags a user typed. The resolved config is written to the run folder, so ``--resume RUN_DIR`` needs nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from minialign.errors import UserError

PRESETS = Path(__file__).parent / "configs"

# Flag groups, in the order `--help` lists them.
GROUPS = ("model", "data", "lora", "training", "speed", "memory", "distributed", "dpo", "rm", "eval", "run", "output")


def opt(default, help: str, *, group: str, choices: tuple | None = None, metavar: str | None = None):
    """A config field with its one-line ``--help`` text, flag group and allowed values.

    The description lives here, beside the field, and nowhere else: ``add_flags`` builds the CLI from it, so
    the help cannot drift from the config. Lists get a ``default_factory``.
    """
    meta = {"help": help, "group": group, "choices": choices, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything SFT and DPO share: model, data, adapter, optimisation, run folder."""

    model: str = "EleutherAI/pythia-70m"
    tokenizer: str = ""  # empty: the model's own
    dataset: str = "Anthropic/hh-rlhf"  # hub id, local file(s)/glob, or "demo"
    data_dir: str = "harmless-base"
    train_split: str = "train"
    train_rows: str = ""  # "START:STOP" over raw rows, e.g. "300:"
    eval_data: str = ""  # empty: the same source as training
    eval_split: str = "test"
    eval_rows: str = ""
    limit: int = 0  # cap on training pairs (0 = all)
    eval_limit: int = 200  # cap on held-out pairs used for evaluation during training
    max_length: int = 512
    max_prompt_length: int = 256
    chat_template: bool = False  # rewrite HH dialogues in the tokenizer's chat template (instruct models)
    full: bool = False  # full fine-tuning instead of LoRA
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # or comma-separated module names
    use_rslora: bool = False
    epochs: int = 1
    max_steps: int = 0  # 0: run the epochs
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0: no clipping
    seed: int = 0
    log_every: int = 10  # read metrics back from the device every N steps (each step still gets its metrics row)
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # checkpoint every N steps and at the end (0: none, except when stopped by a signal)
    keep_last: int = 2
    out: str = ""
    device: str = "auto"  # auto | cpu | cuda
    packing: bool = False  # SFT only: fixed-length rows of several documents
    # Each batch as one row of its sequences back to back (document-masked attention): no FLOPs on padding.
    padding_free: bool = False
    # The fast GPU setting in one switch: padding-free batches with shapes planned up front, varlen attention and
    # whole-step CUDA graphs where the run allows them. auto: on with CUDA, off elsewhere; off leaves each flag as set.
    fast: str = "auto"  # auto | on | off
    # packed / padding-free rows: auto (varlen attention on CUDA, dense mask on CPU) | varlen | sdpa | flex
    attention: str = "auto"
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs (pad to max_length)
    compile_scope: str = "blocks"  # blocks: one compiled block serves every block (fast to compile) | model: one graph
    pad_to_multiple_of: int = 8  # fewer distinct shapes: tensor-core friendly, fewer recompiles
    pad_targets_to_multiple_of: int = 64  # round the output projection's rows up too (0: off); see add_target_index
    # Padding-free runs plan their batch shapes before the first step (shapes.plan_shapes): at most this many row
    # lengths, each with at most target_buckets target counts, so captures and compilations are counted up front.
    shape_buckets: int = 4  # 0: no plan (row lengths rounded to pad_to_multiple_of, one shape per length)
    target_buckets: int = 1  # a capture costs more than padding the output projection's rows of a whole epoch
    # The model's own weights: the frozen base under LoRA (auto: bf16 on CUDA, else float32), or the trained weights
    # with --full (auto: float32; bfloat16: AdamW keeps float32 moments and rounds each update stochastically, so
    # 12 instead of 16 bytes a parameter and no bf16 copies in the forward; one process only).
    base_dtype: str = "auto"
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    # Step AdamW on each parameter as soon as its gradient is complete and free that gradient at once, so the
    # whole-model gradient never exists (full fine-tuning: 12 instead of 16 bytes a parameter). One process
    # only, and needs max_grad_norm 0 and grad_accum 1.
    optim_in_backward: bool = False
    # Replay each training step (forward, backward, clipping, AdamW) as one CUDA graph per batch shape: no host
    # cost per step. CUDA, one process, grad_accum 1; round shapes coarsely (padding_free + pad_to_multiple_of 512).
    cuda_graphs: bool = False
    loss_chunk_size: int = 0  # rows of the output projection computed at once (0: 128 MiB chunks); lower it to cut peak memory
    tensorboard: bool = False
    merge: bool = False  # also save merged weights at the end
    dist: str = "auto"  # auto | none | ddp | fsdp (under torchrun)

    def validate(self) -> None:
        checks = [
            (self.lr > 0, "lr must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.epochs >= 1 or self.max_steps > 0, "epochs must be >= 1 (or set max_steps)"),
            (self.max_steps >= 0, "max_steps must be >= 0"),
            (self.max_length >= 8, "max_length must be >= 8"),
            (0 < self.max_prompt_length < self.max_length, "max_prompt_length must be in (0, max_length)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.schedule in ("cosine", "linear", "constant"), "schedule must be cosine, linear or constant"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.dist in ("auto", "none", "ddp", "fsdp"), "dist must be auto, none, ddp or fsdp"),
            (self.base_dtype in ("auto", "float32", "bfloat16"), "base_dtype must be auto, float32 or bfloat16"),
            (self.pad_to_multiple_of >= 0, "pad_to_multiple_of must be >= 0"),
            (self.pad_targets_to_multiple_of >= 0, "pad_targets_to_multiple_of must be >= 0 (0: off)"),
            (not (self.padding_free and self.packing), "padding_free and packing exclude each other: packed rows "
             "are already free of padding; choose one"),
            (self.attention in ("auto", "sdpa", "flex", "varlen"), "attention must be auto, varlen, sdpa or flex"),
            (self.fast in ("auto", "on", "off"), "fast must be auto, on or off"),
            (self.shape_buckets >= 0, "shape_buckets must be >= 0 (0: no shape plan)"),
            (self.target_buckets >= 1, "target_buckets must be >= 1"),
            (self.compile_scope in ("blocks", "model"), "compile_scope must be blocks or model"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0: no clipping)"),
            (self.loss_chunk_size >= 0, "loss_chunk_size must be >= 0 (0: automatic)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"Invalid configuration: {message}.")
        from minialign.dist import launched_world

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
    out: str = "runs/sft"


@dataclass
class DPOConfig(TrainConfig):
    sft: str = ""  # an SFT run folder to start from (its final adapter is merged into the base)
    adapter: str = ""  # or a PEFT-format adapter for --model
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | hinge | ipo | robust | simpo
    label_smoothing: float = 0.0
    rpo_alpha: float = opt(0.0, "RPO: add this x the chosen response's mean token NLL to each pair's loss (0: plain "
                           "DPO); per response, where TRL's rpo_alpha averages over a batch's chosen tokens",
                           group="dpo")
    simpo_gamma: float = 0.5
    precompute_ref: bool = False
    # Padding-free batches compute each prompt once and branch both responses off it (exact: same keys and
    # positions); HH prompts are long, so ~1.5x fewer positions. --no-share-prompt lays pairs out as SFT does.
    share_prompt: bool = True
    lr: float = 5e-5
    out: str = "runs/dpo"

    def validate(self) -> None:
        super().validate()
        from minialign.losses import LOSS_TYPES

        if self.beta <= 0:
            raise UserError("Invalid configuration: beta must be > 0 (try 0.1).")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError("Invalid configuration: label_smoothing must be in [0, 0.5).")
        if self.rpo_alpha < 0:
            raise UserError(f"Invalid configuration: rpo_alpha must be >= 0 (got {self.rpo_alpha}; try 1.0, or 0 "
                            "for plain DPO).")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"Invalid configuration: loss_type must be one of {', '.join(LOSS_TYPES)}.")
        if self.sft and self.adapter:
            raise UserError("Give either --sft RUN_DIR or --adapter DIR, not both.")


@dataclass
class RunConfig:
    """`minialign run`: the reference experiment — LoRA table and benchmark, SFT, DPO, evaluation, report."""

    model: str = "EleutherAI/pythia-70m"
    tokenizer: str = ""
    dataset: str = "Anthropic/hh-rlhf"
    data_dir: str = "harmless-base"
    train_data: str = ""  # local files for training (default: the dataset's train split)
    train_rows: str = ""
    eval_data: str = ""  # local files for evaluation (default: the dataset's test split)
    eval_rows: str = ""
    chat_template: bool = False
    out: str = "runs/run"
    stages: list[str] = field(default_factory=lambda: ["lora", "sft", "dpo", "eval", "report"])
    ranks: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    bench_steps: int = 30
    bench_batch_size: int = 8
    eval_pairs: int = 200
    samples: int = 5
    max_new_tokens: int = 64
    seed: int = 0
    device: str = "auto"
    eval_prompts: int = opt(100, "held-out prompts the eval stage answers with the reference and the DPO policy "
                            "for the generation metrics (0: skip them)", group="eval")
    eval_samples: int = opt(4, "sampled answers per prompt for the generation metrics, besides the greedy one",
                            group="eval")
    eval_temperature: float = opt(0.7, "sampling temperature of the generation metrics", group="eval")
    eval_top_p: float = opt(0.9, "nucleus sampling top-p of the generation metrics", group="eval")
    judge: str = opt("", "a reward-model run folder (`minialign rm`) that scores the generation metrics' answers: "
                     "adds the policy's win rate over the reference (95% CI) to the report", group="eval",
                     metavar="RUN_DIR")
    sft: dict = field(default_factory=dict)  # overrides of SFTConfig fields
    dpo: dict = field(default_factory=dict)  # overrides of DPOConfig fields


def _field_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def load_yaml(path: str | Path, cls) -> dict:
    """Read a preset and check every key against the dataclass, naming the file and the bad key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist (presets live in {PRESETS}).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"Config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"Config file {path} must hold a mapping of field: value, not {type(data).__name__}.")
    check_keys(data, cls, str(path))
    return data


def check_keys(data: dict, cls, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}. Valid fields: {', '.join(sorted(names))}.")


def build(cls, *layers: dict):
    """Instantiate ``cls`` from dicts applied in order, coercing YAML scalars to the field types."""
    types = _field_types(cls)
    values: dict = {}
    for layer in layers:
        for key, value in layer.items():
            values[key] = _coerce(value, types[key], key)
    return cls(**values)


def _coerce(value, kind, key: str):
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"Field {key}: expected true or false, got {value!r}.")
        return bool(value)
    if kind in (int, float, str):
        if kind is int and isinstance(value, float) and not value.is_integer():
            value = None  # 2.5 is no int; fall through to the error
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise UserError(f"Field {key}: expected {kind.__name__}, got {value!r}.") from None
    return value


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per dataclass field; defaults are suppressed so only typed flags override presets."""
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or types[f.name] is dict:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = types[f.name]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=f.name, nargs="+", type=typing.get_args(kind)[0], default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper())


def flag_values(args: argparse.Namespace, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def save_config(config, path: Path) -> None:
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")


def preset(name: str) -> Path:
    return PRESETS / f"{name}.yaml"


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
    n: int = opt(100, "number of prompts: the first N usable ones of the rows, in order", group="eval")
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
    show: int = opt(8, "prompts shown side by side in eval.md and on the terminal", group="eval")
    device: str = opt("auto", "where to run", group="eval", choices=("auto", "cpu", "cuda"))
    out: str = opt("", "output folder for eval.json and eval.md (default: <policy run>/eval, else runs/eval)",
                   group="output")

    def validate(self) -> None:
        checks = [
            (bool(self.policy), "--policy is required (a minialign sft/dpo run folder, or a model name/path)"),
            (self.n >= 1, "n must be >= 1"),
            (self.samples >= 0, "samples must be >= 0 (0: greedy only)"),
            (self.samples == 0 or self.temperature > 0, "temperature must be > 0 when sampling"),
            (self.samples == 0 or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.batch_size >= 0, "batch_size must be >= 0 (0: automatic)"),
            (self.judge_batch_size >= 1, "judge_batch_size must be >= 1"),
            (self.show >= 0, "show must be >= 0"),
            (self.chat_template in ("auto", "on", "off"), "chat_template must be auto, on or off"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (not (self.adapter and _is_run_dir(self.policy)), "--adapter goes with a model name/path, not a run "
             "folder (a run folder brings its own final adapter)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"Invalid configuration: {message}.")


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
