"""The peer we race: Hugging Face TRL (SFTTrainer / DPOTrainer) + PEFT, used as a library.

``run_trl(...)`` trains the same model (``minialign.modeling.models.load_model``, random init, float32 weights,
bf16 autocast through ``bf16=True``) on the same token ids, in the same order, that ``bench_gpu.py``
gives minialign, and returns one result row::

    {"trainer": "trl", "task", "mode", "batch_size", "tokens_per_s", "pairs_per_s", "peak_memory_mb", "final_loss", ...}

How it is made comparable (see benchmarks/README.md for the whole workload):

* **Same tokens.** minialign's tokenization (prompt keeps its last ``max_prompt_length`` tokens, the response
  is cut to fit ``max_length`` and ends with EOS) is done once and handed to TRL already tokenized: for SFT as
  TRL's documented pre-tokenized prompt-completion format (``input_ids`` + ``completion_mask`` with
  ``completion_only_loss=True``, so the loss is on the response, like ours); for DPO as the
  ``prompt_ids``/``chosen_ids``/``rejected_ids`` columns its own preparation would produce (a subclass
  returns them unchanged from ``_prepare_dataset``: DPOTrainer has no pre-tokenized input path). Tokenizing
  is outside the timed steps either way. ``tokenized=False`` instead gives TRL the text and lets it tokenize
  and truncate in its own way (``keep_start`` at ``max_length``).
* **Same order.** The rows are laid out in the benchmark's order and read with
  ``train_sampling_strategy="sequential"`` and ``dataloader_drop_last=True``, so batch k holds the same
  examples as minialign's batch k.
* **Same step.** AdamW (transformers' default, fused on CUDA), lr 1e-4 constant, grad-norm clip 1.0,
  per-device batch = ``batch_size``, no gradient accumulation. Gradient checkpointing is *off* (TRL's
  configs default it to on; minialign does not recompute activations, and TRL is faster without it);
  ``gradient_checkpointing=True`` measures TRL's default.
* **Timing.** A ``TrainerCallback`` synchronises the device and reads ``perf_counter`` at ``on_step_end`` of
  step ``warmup`` and of the last step, so the window holds exactly ``steps`` whole optimiser steps, each
  with its own batch fetch/collation, forward, backward, clipping and optimiser step.
* **Tokens.** The trainer's collator is wrapped after construction: each collated batch's real
  (non-padding) token count is recorded on the host, in collation order. With ``num_workers=0`` the loader
  collates batches in the order they are trained on (accelerate may collate one batch ahead, which only
  appends a record), so batches ``warmup .. warmup+steps-1`` are exactly the timed ones. This counts what
  the trainer really saw (TRL's own packing included) with no device sync inside the timed steps.
* **Reference model (DPO).** LoRA: none, TRL disables the adapters (like minialign). Full: a frozen
  ``deepcopy`` of the initial policy is passed as ``ref_model``. TRL would otherwise rebuild the reference
  with ``from_pretrained(config._name_or_path)``, which for a built-in random-init config ("pythia-70m")
  is not a loadable hub id. The copy keeps the policy's dtype (float32), as TRL's own would.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

# The four block linears of GPT-NeoX (minialign's "all-linear" minus the output head).
GPT_NEOX_LINEARS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
LR = 1e-4


# ----------------------------------------------------------------------------- helpers shared with bench_gpu.py


def batch_stats(batch: dict) -> tuple[int, int]:
    """(real tokens, sum over documents of length**2) of one collated batch, from host tensors.

    Real tokens are those with ``attention_mask == 1`` (all tokens when there is no mask: padding-free
    batches). Documents start where ``position_ids`` restart at 0 (packing) or at each row; the squared
    lengths give the attention FLOPs (see README).
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
    pos = batch.get("position_ids")
    if torch.is_tensor(pos) and pos.shape == ids.shape:
        starts = pos == 0
    else:
        starts = torch.zeros_like(ids, dtype=torch.bool)
    starts = starts & real
    starts[:, 0] = True  # every row starts a new document
    doc = torch.cumsum(starts.flatten().long(), 0)
    lengths = torch.bincount(doc[real.flatten()])
    return int(real.sum()), int((lengths.long() ** 2).sum())


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    from minialign.training.bench import peak_rss_mb

    return peak_rss_mb(), "cpu_peak_rss"


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_workload(task: str, data_path: str, tokenizer_path: str, max_length: int, max_prompt_length: int,
                  seed: int = 0) -> tuple[Any, list, list[int]]:
    """(tokenizer, tokenized examples, order): what both trainers are fed; ``order`` is a permutation."""
    from minialign.data import batch_indices, load_preference_pairs, tokenize_pairs, tokenize_sft
    from minialign.modeling.models import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    pairs = load_preference_pairs(data_path)
    fn = tokenize_sft if task == "sft" else tokenize_pairs
    items = fn(pairs, tok, max_length=max_length, max_prompt_length=max_prompt_length)
    order = [i for b in batch_indices(len(items), 1, seed=seed, epoch=0) for i in b]
    return tok, list(items), order


# ----------------------------------------------------------------------------- the TRL run


class _CountingCollator:
    """Wraps the trainer's collator; records (real tokens, sum of squared document lengths) per batch."""

    def __init__(self, inner):
        self.inner = inner
        self.records: list[tuple[int, int]] = []

    def __call__(self, features):
        batch = self.inner(features)
        self.records.append(batch_stats(batch))
        return batch


def _timer_callback(warmup: int, total: int, device: torch.device):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """perf_counter after a device sync, at the end of step ``warmup`` and of step ``total``."""

        def __init__(self):
            self.start = self.end = None

        def on_train_begin(self, args, state, control, **kwargs):
            if warmup == 0:
                _sync(device)
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup and warmup > 0:
                _sync(device)
                self.start = time.perf_counter()
            if state.global_step == total:
                _sync(device)
                self.end = time.perf_counter()

    return StepTimer()


def _with_last_loss(cls):
    """A subclass of a TRL trainer that keeps the last step's loss (a device tensor: no sync per step)."""

    class Timed(cls):
        last_loss = None

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.last_loss = loss.detach()
            return loss

        # DPO has no pre-tokenized input path: hand back the columns its own preparation would produce.
        def _prepare_dataset(self, dataset, *args, **kwargs):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, *args, **kwargs)

    Timed.__name__ = Timed.__qualname__ = f"Timed{cls.__name__}"
    return Timed


def _dataset(task: str, items: Sequence, order: Sequence[int], tokenized: bool, pairs_text: Sequence | None):
    from datasets import Dataset

    if not tokenized:
        rows = [pairs_text[i] for i in order]
        if task == "sft":
            return Dataset.from_dict({"prompt": [p.prompt for p in rows], "completion": [p.chosen for p in rows]})
        return Dataset.from_dict({"prompt": [p.prompt for p in rows], "chosen": [p.chosen for p in rows],
                                  "rejected": [p.rejected for p in rows]})
    rows = [items[i] for i in order]
    if task == "sft":
        return Dataset.from_dict({
            "input_ids": [ex.prompt_ids + ex.response_ids for ex in rows],
            "completion_mask": [[0] * len(ex.prompt_ids) + [1] * len(ex.response_ids) for ex in rows],
        })
    return Dataset.from_dict({
        "prompt_ids": [p.prompt_ids for p in rows],
        "chosen_ids": [p.chosen_ids for p in rows],
        "rejected_ids": [p.rejected_ids for p in rows],
    })


def run_trl(task: str, mode: str, batch_size: int, steps: int, warmup: int, data_path: str, tokenizer_path: str,
            max_length: int, device: str | torch.device, *, max_prompt_length: int | None = None,
            model_name: str = "pythia-70m", packing: bool = False, gradient_checkpointing: bool = False,
            lora_r: int = 8, beta: float = 0.1, lr: float = LR, seed: int = 0, tokenized: bool = True,
            workload: tuple | None = None, bf16: bool | None = None) -> dict:
    """Train ``warmup + steps`` steps with TRL (+ PEFT for ``mode="lora"``) and measure the last ``steps``.

    ``workload`` = ``load_workload(...)``'s result, to tokenize once for many runs (else it is built from
    ``data_path``/``tokenizer_path``). ``max_prompt_length`` defaults to ``max_length // 2``.
    Returns the result row (see the module docstring); extra keys: ``tokens`` and ``attn_sq`` (sums over
    the timed batches, for MFU), ``elapsed_s``, ``memory_kind``, ``packing``, ``gradient_checkpointing``,
    ``steps``, ``warmup``, ``device``.
    """
    if task not in ("sft", "dpo") or mode not in ("lora", "full"):
        raise ValueError(f"task must be sft|dpo and mode lora|full, got {task!r}, {mode!r}")
    if packing and task != "sft":
        raise ValueError("packing applies to SFT only")
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from minialign.modeling.models import load_model

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    bf16 = device.type == "cuda" if bf16 is None else bf16
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if workload is None:
        workload = load_workload(task, data_path, tokenizer_path, max_length, max_prompt_length, seed)
    tok, items, order = workload
    pairs_text = None
    if not tokenized:
        from minialign.data import load_preference_pairs

        pairs_text = list(load_preference_pairs(data_path))
    total = warmup + steps

    common = dict(
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_steps=total,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=bf16, fp16=False, use_cpu=device.type == "cpu", gradient_checkpointing=gradient_checkpointing,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, dataloader_drop_last=True, train_sampling_strategy="sequential", seed=seed,
        max_length=max_length,
    )
    peft_config = None
    if mode == "lora":
        peft_config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=GPT_NEOX_LINEARS,
                                 bias="none", task_type="CAUSAL_LM")

    reset_memory(device)
    model = load_model(model_name, seed=seed)
    trainer = None
    tmp = tempfile.TemporaryDirectory(prefix="trl_peer_")
    with warnings.catch_warnings():
        # transformers 5.2x renamed gradient_checkpointing (which TRL's configs still set) to activation_checkpointing
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
        try:
            dataset = _dataset(task, items, order, tokenized, pairs_text)
            timer = _timer_callback(warmup, total, device)
            if task == "sft":
                args = SFTConfig(output_dir=tmp.name, packing=packing, completion_only_loss=True, **common)
                cls = _with_last_loss(SFTTrainer)
                trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config,
                              callbacks=[timer])
            else:
                args = DPOConfig(output_dir=tmp.name, beta=beta, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                                 **common)
                ref = None if mode == "lora" else copy.deepcopy(model).eval().requires_grad_(False)
                cls = _with_last_loss(DPOTrainer)
                trainer = cls(model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tok,
                              peft_config=peft_config, callbacks=[timer])
            counter = _CountingCollator(trainer.data_collator)
            trainer.data_collator = counter
            n_batches = len(trainer.train_dataset) // batch_size
            if n_batches < 1:
                raise ValueError(f"{len(trainer.train_dataset)} training rows are fewer than one batch of {batch_size}")
            output = trainer.train()
            _sync(device)
            if timer.start is None or timer.end is None:
                raise RuntimeError(f"the trainer ran {trainer.state.global_step} of {total} steps")
            elapsed = timer.end - timer.start
            timed = counter.records[warmup:total]
            if len(timed) != steps:
                raise RuntimeError(f"counted {len(counter.records)} collated batches for {total} steps")
            tokens = sum(t for t, _ in timed)
            attn_sq = sum(s for _, s in timed)
            peak, kind = peak_memory(device)
            pairs = steps * batch_size if task == "dpo" else 0
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            with warnings.catch_warnings():  # renamed is_activation_checkpointing in transformers 5.2x
                warnings.simplefilter("ignore")
                checkpointing = bool(getattr(unwrapped, "is_gradient_checkpointing", False))
            return {
                "trainer": "trl", "task": task, "mode": mode, "batch_size": batch_size,
                "tokens_per_s": tokens / elapsed, "pairs_per_s": pairs / elapsed if task == "dpo" else None,
                "peak_memory_mb": peak, "final_loss": float(trainer.last_loss) if trainer.last_loss is not None else None,
                "memory_kind": kind, "device": str(device), "steps": steps, "warmup": warmup, "elapsed_s": elapsed,
                "tokens": tokens, "attn_sq": attn_sq, "packing": packing, "gradient_checkpointing": checkpointing,
                "trainable_params": trainable, "mean_train_loss": float(output.training_loss),
                "tokenized_by": "minialign" if tokenized else "trl",
            }
        finally:
            if trainer is not None:
                with contextlib.suppress(Exception):  # cleanup must not hide the real error
                    trainer.accelerator.free_memory()
            del trainer, model
            tmp.cleanup()
            reset_memory(device)
