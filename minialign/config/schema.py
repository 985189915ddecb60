"""The training commands' configs (sft, dpo, rm; online's is in ``config.online``): their fields (with their
``--help`` text) and validation.

Turning YAML presets and typed flags into one of these lives in ``minialign.config.presets``; this module reads no files.
"""

from __future__ import annotations

from dataclasses import dataclass

from minialign.base.errors import UserError
from minialign.config.fields import LOSS_TYPES, TRACKERS, TRUNCATIONS, check_choices, opt, parse_rows, prompt_length
from minialign.config.modelnames import model_help


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
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (with --optim-in-backward: the previous "
                               "step's norm); 0: no clipping", group="training")
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
    offload_activations: bool = opt(False, "with --grad-checkpointing: keep each block's saved input in pinned CPU "
                                    "memory until backward (CUDA; the copies overlap compute; eager, one process)",
                                    group="memory")
    optim_in_backward: bool = opt(False, "step AdamW on each parameter as soon as its gradient is complete and free "
                                  "it: no whole-model gradient (one process, --grad-accum 1; clips by the previous step's norm)",
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

    def validate(self, world: int = 1) -> None:
        """Checks of the config alone. ``world``: the number of processes the run is launched on (torchrun's)."""
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
        parse_rows(self.train_rows or None, "--train-rows")  # a malformed or empty span fails before anything loads
        parse_rows(self.eval_rows or None, "--eval-rows")
        if self.optim_in_backward:
            self.check_optim_in_backward(world)
        if self.offload_activations:
            self.check_offload(world)
        if self.full and self.base_dtype == "bfloat16":
            self.check_bf16_weights(world)
        if self.cuda_graphs:
            self.check_cuda_graphs(world)

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

    def check_offload(self, world: int) -> None:
        """``offload_activations`` moves what eager activation checkpointing keeps, in one process."""
        problems = [
            (not self.grad_checkpointing, "it moves the block inputs that activation checkpointing keeps: add "
             "--grad-checkpointing"),
            (self.compile, "compiled blocks checkpoint inside the compiled code, which it does not reach: drop "
             "--compile"),
            (world > 1, f"it runs in one process only (this is one of {world} torchrun processes): drop it under "
             "torchrun"),
        ]
        for bad, why in problems:
            if bad:
                raise UserError(f"Invalid configuration: --offload-activations: {why}.")

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
    truncation: str = opt("prompt", "how an example longer than --max-length is cut: prompt (the prompt keeps its "
                          "end, up to --max-prompt-length, the response the room left) or keep-start (its first "
                          "--max-length tokens; an example whose prompt fills them is left out: TRL's SFT default)",
                          group="data", choices=TRUNCATIONS)
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

    def validate(self, world: int = 1) -> None:
        super().validate(world)
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
class RMConfig(TrainConfig):
    """`minialign rm`: a Bradley-Terry reward model (scalar head on the last token) on the same preference data."""

    center_rewards_coefficient: float = opt(
        0.0, "weight of (r_chosen + r_rejected)^2 in the loss, keeping rewards centred on 0 (TRL's "
        "center_rewards_coefficient; 0: off)", group="rm")
    share_prompt: bool = opt(True, "padding-free batches compute each prompt once, both responses branching off it "
                             "(exact; HH prompts are long)", group="speed")
    lr: float = opt(1e-4, "peak learning rate", group="training")
    out: str = opt("runs/rm", "run folder", group="output")

    def validate(self, world: int = 1) -> None:
        super().validate(world)
        if self.center_rewards_coefficient < 0:
            raise UserError("Invalid configuration: center_rewards_coefficient must be >= 0 (TRL suggests 0.01; 0: off).")
        if self.packing:
            raise UserError("Invalid configuration: packing is for SFT; reward models train on pairs. Use --padding-free "
                            "(or --fast on) for batches without padding.")
