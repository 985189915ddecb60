"""The TRL side of the end-to-end race: the script a TRL + PEFT user would write for one run, plus measurement.

``bench_e2e.py`` starts it in a fresh Python process and counts the wall clock from its own spawn time to the
``t_done`` this script records right after the final held-out ``trainer.evaluate``: Python start, imports, loading
the model and data, TRL's own tokenization (the trainer is given text, as a user gives it), every training step
and that evaluation. What follows ``t_done`` (saving the trained adapter or model for the shared evaluator, the
JSON) is not counted; minialign's command, by contrast, is timed to its exit, save included.

The run mirrors minialign's CLI flags: the same rows of the same file (``minialign.data.load_preference_pairs``),
epochs, batch, learning rate, schedule, warm-up, beta, LoRA r/alpha on every block linear, max_length, seed. TRL
1.16 has no prompt-length limit: ``max_length`` cuts each whole sequence keeping its start, where minialign keeps
the last ``max_prompt_length`` prompt tokens and cuts the response. Gradient checkpointing is off (TRL's default
is on; minialign does not recompute activations). ``--minialign-data`` (SFT, a diagnosis) gives TRL's trainer
minialign's tokenization instead (``minialign.data.tokenize.tokenize_sft``, pre-tokenized); ``--minialign-order``
(SFT, a diagnosis) draws TRL's own examples in minialign's order, batch for batch. Throughput counting and
step timing reuse ``trl_peer``'s collator wrapper and step-timer callback, so they mean the same as in
``bench_gpu.py``.
"""

from __future__ import annotations

import time

T_START = time.time()  # before the heavy imports: they are part of what a user waits for

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_peer import _CountingCollator, _dataset, _sync, _timer_callback, _with_last_loss, peak_memory  # noqa: E402


def steady_from(total: int) -> int:
    """The step after which throughput counts as steady, as minialign's loop picks it: the first multiple of 10 at
    or past a tenth of the run (so the window skips start-up costs), or 0 (the whole run) when that is the end."""
    mark = -(-max(1, math.ceil(0.1 * total)) // 10) * 10
    return mark if mark < total else 0


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The run both trainers are given (bench_e2e.py passes the same flags on to each runner)."""
    p.add_argument("--task", choices=["dpo", "sft"], required=True)
    p.add_argument("--mode", choices=["lora", "full"], required=True)
    p.add_argument("--model", required=True, help="anything minialign.modeling.models.load_model takes")
    p.add_argument("--tokenizer", required=True, help="anything minialign.modeling.models.load_tokenizer takes")
    p.add_argument("--train-rows", default="300:")
    p.add_argument("--eval-rows", default="0:300")
    p.add_argument("--limit", type=int, default=0, help="cap on training pairs (0: all), as minialign's --limit")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template", action="store_true",
                   help="rewrite HH dialogues in the tokenizer's chat template first (minialign's --chat-template)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--max-prompt-length", type=int, default=256,
                   help="recorded only (TRL 1.16 has no prompt-length limit: max_length cuts whole sequences), "
                        "except with --minialign-data, whose tokenization keeps this many prompt tokens")
    p.add_argument("--out-json", required=True)
    p.add_argument("--adapter-out", default="", help="where the trained adapter (or full model) goes; "
                   "default: final/ beside --out-json")
    p.add_argument("--minialign-data", action="store_true",
                   help="SFT only, a diagnosis: train on minialign's tokenization of the rows (its prompt cut to "
                        "--max-prompt-length from the left, no row dropped) instead of TRL's, so a learning gap "
                        "between the tools splits into the data's share and the trainer's")
    p.add_argument("--minialign-order", action="store_true",
                   help="SFT only, a diagnosis: draw the examples (after TRL's own filtering) in the order and batches "
                        "minialign draws the same number of examples at this seed (data.batching.batch_indices), so "
                        "beside `minialign sft --truncation keep-start` (the same examples) only the step differs")
    args = p.parse_args(argv)
    for flag in ("minialign_data", "minialign_order"):
        if getattr(args, flag) and args.task != "sft":
            p.error(f"--{flag.replace('_', '-')} is for --task sft only")
    return args


def order_hash(order: list[int]) -> str:
    """A short fingerprint of an example order, to compare a run's order with minialign's without storing it."""
    import hashlib

    return hashlib.sha256(",".join(map(str, order)).encode()).hexdigest()[:16]


class MinialignOrder(torch.utils.data.Sampler):
    """minialign's example order for one process (``batch_indices``: a seeded shuffle of each epoch), as the sampler
    of TRL's trainer. ``drawn`` keeps each epoch's order, so a run can show which one it trained on."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.epoch, self.drawn = n, batch_size, seed, 0, {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        from minialign.data.batching import batch_indices

        order = [i for b in batch_indices(self.n, self.batch_size, seed=self.seed, epoch=self.epoch) for i in b]
        self.drawn[self.epoch] = order
        return iter(order)


def trainer_args(args: argparse.Namespace, cls, output_dir: str, cuda: bool, **extra):
    """The DPOConfig / SFTConfig a user would write for these flags; version-dependent names are resolved here."""
    fields = {f.name for f in dataclasses.fields(cls)}
    schedule = "constant_with_warmup" if args.schedule == "constant" and args.warmup_ratio > 0 else args.schedule
    kwargs = dict(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=1, num_train_epochs=args.epochs, learning_rate=args.lr,
        lr_scheduler_type=schedule, weight_decay=0.0, max_grad_norm=1.0, bf16=cuda, fp16=False, use_cpu=not cuda,
        gradient_checkpointing=False, logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none",
        seed=args.seed, dataloader_drop_last=False, max_length=args.max_length,
    )
    kwargs.update(extra)  # a peer's own settings (Unsloth: its optimiser) win over the shared ones
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio); older versions keep both.
    if "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = args.warmup_ratio
    else:
        kwargs["warmup_steps"] = args.warmup_ratio
    return cls(**kwargs)


def load_with_peft(args: argparse.Namespace) -> tuple:
    """TRL + PEFT as its docs show: the model (minialign's loader, float32 weights, bf16 autocast via ``bf16=True``)
    and a PEFT ``LoraConfig`` on every linear the trainer wraps itself. Returns (tokenizer, model, peft_config,
    extra trainer arguments, versions)."""
    import peft
    import transformers
    import trl
    from peft import LoraConfig

    from minialign.modeling.models import load_model, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    model = load_model(args.model, seed=args.seed, dtype=torch.float32)
    peft_config = None
    if args.mode == "lora":
        alpha = int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=alpha, lora_dropout=0.0,
                                 target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    versions = {"transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__}
    return tok, model, peft_config, {}, versions


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args(argv), "trl", load_with_peft, T_START)


def run_script(args: argparse.Namespace, runner: str, load, t_start: float, row_extra: dict | None = None) -> int:
    """One user script around TRL's trainers: ``load(args)`` gives (tokenizer, model, peft_config, extra config
    fields, versions); the rest (data, trainer, timing, the held-out ``trainer.evaluate``, the JSON) is the same for
    every peer that drives TRL's trainers (plain TRL + PEFT here, Unsloth in ``unsloth_peer.py``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from minialign.base.files import write_json
    from minialign.data import load_preference_pairs
    from minialign.data.chat import to_chat_format

    marks = {"imports": time.time()}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    out_json = Path(args.out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    adapter_out = Path(args.adapter_out) if args.adapter_out else out_json.parent / "final"

    # ---- what the user's script does: model, data, trainer, train, held-out evaluation (all timed)
    tok, model, peft_config, extra, versions = load(args)
    marks["model"] = time.time()
    train_pairs = load_preference_pairs(args.data, rows=args.train_rows or None, limit=args.limit or None)
    eval_pairs = load_preference_pairs(args.data, rows=args.eval_rows or None)
    if args.chat_template:  # the same text minialign trains on: TRL gets explicit prompt/chosen/rejected strings
        train_pairs, eval_pairs = to_chat_format(train_pairs, tok), to_chat_format(eval_pairs, tok)
    if getattr(args, "minialign_data", False):  # the same token ids and loss mask minialign trains on
        from minialign.data.tokenize import tokenize_sft

        items = tokenize_sft(train_pairs, tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
        train_ds = _dataset("sft", items, range(len(items)), True, None)
    else:
        train_ds = _dataset(args.task, None, range(len(train_pairs)), False, train_pairs)
    eval_ds = _dataset(args.task, None, range(len(eval_pairs)), False, eval_pairs)
    marks["data"] = time.time()
    workdir = str(out_json.parent / "trainer")
    with warnings.catch_warnings():
        # transformers 5.2x renamed gradient_checkpointing (which TRL's configs still set) to activation_checkpointing
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        if args.task == "sft":
            config = trainer_args(args, SFTConfig, workdir, cuda, completion_only_loss=True, packing=False, **extra)
            trainer = _with_last_loss(SFTTrainer)(model=model, args=config, train_dataset=train_ds,
                                                  processing_class=tok, peft_config=peft_config)
        else:
            # A built-in random model cannot be rebuilt from its name, so full DPO gets its frozen reference here.
            ref = None if args.mode == "lora" else copy.deepcopy(model).eval().requires_grad_(False)
            config = trainer_args(args, DPOConfig, workdir, cuda, beta=args.beta, loss_type=["sigmoid"], **extra)
            trainer = _with_last_loss(DPOTrainer)(model=model, ref_model=ref, args=config, train_dataset=train_ds,
                                                  processing_class=tok, peft_config=peft_config)
        counter = _CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        n_train = len(trainer.train_dataset)  # after TRL's own filtering
        order = MinialignOrder(n_train, args.batch_size, args.seed) if getattr(args, "minialign_order", False) else None
        if order is not None:
            trainer._get_train_sampler = lambda *_, **__: order
        total = args.epochs * math.ceil(n_train / args.batch_size)
        k = steady_from(total)
        timer = _timer_callback(k, total, device)
        trainer.add_callback(timer)
        marks["trainer"] = time.time()
        t0 = time.perf_counter()
        output = trainer.train()
        _sync(device)
        train_s = time.perf_counter() - t0
        marks["train"] = time.time()
        records = list(counter.records)
        if order is not None and sorted(order.drawn) != list(range(args.epochs)):
            raise RuntimeError(f"--minialign-order: the trainer drew epochs {sorted(order.drawn)} from minialign's "
                               f"sampler, not 0..{args.epochs - 1}: it did not train in that order")
        trl_eval = trainer.evaluate(eval_dataset=eval_ds)
        _sync(device)
    t_done = time.time()
    print(f"{runner}: t_done={t_done:.6f}", flush=True)

    # ---- measurement bookkeeping, after t_done: not counted in the wall clock
    peak, kind = peak_memory(device)
    loss_tokens = (sum(sum(t != -100 for t in ex["labels"]) for ex in trainer.train_dataset)
                   if args.task == "sft" else None)  # the tokens the SFT loss is taken over
    steps = trainer.state.global_step
    if steps != total or len(records) < total or timer.end is None or timer.start is None:
        raise RuntimeError(f"expected {total} steps, ran {steps}, collated {len(records)} training batches")
    tokens = sum(t for t, _ in records[:total])
    steady = sum(t for t, _ in records[k:total]) / max(timer.end - timer.start, 1e-9)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpointing = bool(getattr(unwrapped, "is_gradient_checkpointing", False))
    trainer.model.save_pretrained(str(adapter_out))  # PEFT adapter (LoRA) or the whole model (full)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    prev = t_start
    phases = {}
    for name, t in [*marks.items(), ("eval", t_done)]:
        phases[name] = t - prev
        prev = t
    row = {
        "runner": runner, "task": args.task, "mode": args.mode, "model": args.model, "tokenizer": args.tokenizer,
        "steps": steps, "epochs": args.epochs, "batch_size": args.batch_size, "tokens": tokens,
        "tokens_per_s": tokens / train_s, "steady_tokens_per_s": steady, "steady_from_step": k, "train_s": train_s,
        "peak_memory_mb": peak, "memory_kind": kind, "t_start": t_start, "t_done": t_done, "phases_s": phases,
        "trl_eval": trl_eval, "final_train_loss": float(trainer.last_loss) if trainer.last_loss is not None else None,
        "logged_train_loss": losses[-1] if losses else None, "mean_train_loss": output.training_loss,
        "train_pairs": len(train_pairs), "train_rows_after_trl_filter": n_train, "train_loss_tokens": loss_tokens,
        "eval_pairs": len(eval_pairs),
        "gradient_checkpointing": checkpointing, "optim": str(config.optim),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "saved": str(adapter_out),
        "versions": {"torch": torch.__version__, **versions}, **(row_extra or {}),
        **({"minialign_order": {"n": n_train, "sha256": {str(e): order_hash(o) for e, o in order.drawn.items()},
                                "head": {str(e): o[:8] for e, o in order.drawn.items()}}} if order is not None else {}),
    }
    write_json(out_json, row, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
