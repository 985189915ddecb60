"""`minialign sft` and `minialign dpo`: build model, data and task from a config, train, save.

Each recipe is a straight line: run folder -> tokenizer and model -> data -> task -> ``train.train`` ->
final adapter (PEFT format) or model. The loop itself lives in ``train.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minialign.base import dist
from minialign.base.errors import UserError
from minialign.base.files import write_atomic
from minialign.commands import resume as resume_rules
from minialign.commands.common import compile_policy, load_base, prologue, save_final, trainable_weights, wrap_policy
from minialign.config.presets import load_run_config
from minialign.config.schema import DPOConfig, SFTConfig, TrainConfig
from minialign.data import (
    batch_indices,
    collate_packed,
    collate_pairs,
    collate_sft,
    flat_sizes,
    pack_sft,
    sequence_lengths,
    tokenize_pairs,
    tokenize_sft,
)
from minialign.modeling import adapters, lora
from minialign.modeling.blocks import check_fast_path
from minialign.modeling.models import (
    check_vocab,
    load_model,
    refuse_reward_model,
)
from minialign.modeling.policy import TokenLogps
from minialign.ops.losses import PreferenceLoss
from minialign.training.tasks import (
    DPOTask,
    SFTTask,
    adapter_reference,
    cached_reference,
    frozen_copy,
    frozen_reference,
    reference_table,
)
from minialign.training.timing import Stopwatch, write_summary
from minialign.training.train import train, use_varlen


@resume_rules.unless_finished
def sft(cfg: SFTConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    clock = Stopwatch()
    run_dir, point, device, tokenizer, examples, held_out = prologue(cfg, "sft", tokenize_sft, resume=resume,
                                                                      overwrite=overwrite, clock=clock)
    with clock.phase("load"):  # and made ready to train: adapters attached, moved to the device
        model = load_base(cfg, tokenizer)
        check_fast_path(cfg, model, device)
        trainable_weights(model, cfg, device)
        policy = wrap_policy(model, cfg, device)
    pad = tokenizer.pad_token_id
    if cfg.packing:
        rows = pack_sft(examples, cfg.max_length)
        collate = lambda idx: collate_packed(examples, [rows[i] for i in idx], row_length=cfg.max_length, pad_id=pad)
        n_items, lengths = len(rows), None
    else:
        collate = lambda idx: collate_sft([examples[i] for i in idx], pad_id=pad,
                                          pad_to_multiple_of=cfg.pad_to_multiple_of or None,
                                          flat=cfg.padding_free)
        n_items, lengths = len(examples), None
    eval_batches = [collate_sft(held_out[i : i + cfg.batch_size], pad_id=pad, flat=cfg.padding_free)
                    for i in range(0, len(held_out), cfg.batch_size)]
    sizes = flat_sizes(examples) if cfg.padding_free else None
    resume_rules.open_run_dir(cfg, "sft", resume=resume, overwrite=overwrite)
    last = train(policy, SFTTask(), range(n_items), collate, cfg, run_dir, eval_batches=eval_batches, lengths=lengths,
                 sizes=sizes, resume_from=point)
    with clock.phase("save"):
        save_final(model, run_dir, cfg, tokenizer)
    write_summary(run_dir, last, clock)
    return run_dir


def dpo_start_model(cfg: DPOConfig, tokenizer):
    """The model DPO starts from — and, frozen, its reference: base + SFT result merged in."""
    if cfg.sft:
        sft_dir = Path(cfg.sft)
        sft_cfg = load_run_config(sft_dir, SFTConfig)
        final = sft_dir / "final"
        if (final / "model").is_dir():
            return load_model(str(final / "model"))
        if not (final / "adapter").is_dir():
            raise UserError(f"SFT run {sft_dir} has no final/adapter or final/model: did it finish? Resume it first.")
        model = load_model(sft_cfg.model, seed=sft_cfg.seed, cache=cfg.cache)
        check_vocab(model, tokenizer, sft_cfg.model, cfg.tokenizer)
        return lora.merge_lora(adapters.load_adapter(model, final / "adapter"))
    model = load_base(cfg, tokenizer)
    if cfg.adapter:
        model = lora.merge_lora(adapters.load_adapter(model, cfg.adapter))
    return model


def adopt_sft_run(cfg: DPOConfig) -> None:
    """``--sft RUN``: the run's base model and saved tokenizer become ``cfg``'s (a reward-model run is refused)."""
    refuse_reward_model(cfg.sft, "an SFT run (--sft)")
    sft_cfg = load_run_config(Path(cfg.sft), SFTConfig)
    cfg.model = sft_cfg.model
    cfg.tokenizer = cfg.tokenizer or str(Path(cfg.sft) / "final" / "tokenizer")


@resume_rules.unless_finished
def dpo(cfg: DPOConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    if cfg.sft and not resume:
        adopt_sft_run(cfg)
    clock = Stopwatch()
    run_dir, point, device, tokenizer, pairs, held_out = prologue(cfg, "dpo", tokenize_pairs, resume=resume,
                                                                   overwrite=overwrite, clock=clock)
    with clock.phase("load"):
        model = dpo_start_model(cfg, tokenizer)
    check_fast_path(cfg, model, device)
    # Training pairs, then held-out pairs: one index space, so a precomputed reference table covers both.
    both = [*pairs, *held_out]
    collate = pair_collate(both, cfg, tokenizer.pad_token_id)
    task = dpo_task(cfg)
    with clock.phase("load"):
        policy, reference = dpo_policy(model, cfg, device, task)
    resume_rules.open_run_dir(cfg, "dpo", resume=resume, overwrite=overwrite)
    if cfg.precompute_ref and task.objective.needs_reference:
        with clock.phase("reference"):
            reference = cached_reference(_reference_cache(run_dir, policy, reference, collate, len(both), cfg, device))
    task.reference = reference
    n, bs = len(pairs), cfg.batch_size
    eval_batches = [collate(list(range(n + i, n + min(i + bs, len(held_out))))) for i in range(0, len(held_out), bs)]
    sizes = flat_sizes(pairs, share_prompt=cfg.share_prompt) if cfg.padding_free else None
    last = train(policy, task, range(len(pairs)), collate, cfg, run_dir, eval_batches=eval_batches,
                 lengths=sequence_lengths(pairs), sizes=sizes, resume_from=point)
    with clock.phase("save"):
        save_final(model, run_dir, cfg, tokenizer)
    write_summary(run_dir, last, clock)
    return run_dir


def pair_collate(items, cfg: DPOConfig, pad_id: int):
    """``collate(indices)`` of DPO batches over ``items`` (tokenized pairs), laid out as ``cfg`` asks; each batch's
    ``index`` is the pairs' positions in ``items`` (a precomputed reference table is indexed by them)."""
    return lambda idx: collate_pairs([items[i] for i in idx], pad_id=pad_id, index=idx,
                                     pad_to_multiple_of=cfg.pad_to_multiple_of or None, flat=cfg.padding_free,
                                     share_prompt=cfg.padding_free and cfg.share_prompt)


def dpo_task(cfg: DPOConfig) -> DPOTask:
    """The DPO objective of ``cfg`` (every knob by its flag's name), its reference still unset (``dpo_policy``)."""
    return DPOTask(None, PreferenceLoss.from_config(cfg))


def dpo_policy(model, cfg: DPOConfig, device: torch.device, task: DPOTask):
    """(policy, reference) of DPO from ``model``, the starting model: trainable weights attached and wrapped; the
    reference is a frozen copy of ``model`` as it is now (full fine-tuning) or the policy with its adapters off
    (LoRA). Either way the reference stays the starting model however long the policy trains."""
    reference = None
    if cfg.full:
        ref_policy = TokenLogps(frozen_copy(model, device), cfg.loss_chunk_size or None, attention=cfg.attention)
        if cfg.compile:
            compile_policy(ref_policy, cfg)
        reference = frozen_reference(ref_policy, task.normalise)
    trainable_weights(model, cfg, device)
    policy = wrap_policy(model, cfg, device)
    return policy, reference if reference is not None else adapter_reference(policy, task.normalise)


def _reference_cache(run_dir: Path, policy, reference, collate, n: int, cfg: TrainConfig, device) -> torch.Tensor:
    """Reference log-probs of every training and held-out pair, computed once and kept in the run folder.

    Under torchrun each rank scores its share of the pairs and a sum over ranks (of tables that are zero
    outside each share) leaves every rank with the whole table. Every rank runs the same number of batches
    (FSDP gathers weights inside each forward), so one with nothing left in the last batch scores pair 0 again
    and drops it.
    """
    from safetensors.torch import load_file, save

    path = run_dir / "ref_logps.safetensors"
    if path.is_file():
        return load_file(str(path))["logps"]
    shares = batch_indices(n, cfg.batch_size, seed=cfg.seed, epoch=0, shuffle=False, rank=dist.rank(),
                           world_size=dist.world_size())
    table = reference_table(policy, reference, (collate(idx or [0]) for idx in shares), n, device,
                            cfg.pad_targets_to_multiple_of, varlen=use_varlen(cfg, device))
    mine = torch.zeros(n, dtype=torch.bool)
    mine[[i for idx in shares for i in idx]] = True
    table = dist.all_reduce_sum(table.masked_fill(~mine[:, None], 0.0).to(device)).cpu()
    if dist.rank() == 0:
        write_atomic(path, save({"logps": table}))
    return table
