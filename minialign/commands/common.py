"""The set-up every training command shares (sft, dpo, rm, online): run folder, model, adapters, wrapping, saving,
resume. Public, so each command reads as a straight line of these steps."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from minialign.base import dist
from minialign.base.devices import resolve_device
from minialign.base.errors import UserError
from minialign.base.files import publish_dir, staged_dir
from minialign.commands import folders
from minialign.commands import resume as resume_rules
from minialign.config.schema import TrainConfig
from minialign.data import pack_sft
from minialign.data.splits import load_pairs
from minialign.data.tokenize import check_tokenized
from minialign.modeling import adapters, lora, offload
from minialign.modeling.blocks import transformer_blocks
from minialign.modeling.models import check_model_source, check_vocab, default_tokenizer, load_model, load_tokenizer
from minialign.modeling.policy import TokenLogps
from minialign.training.timing import Stopwatch
from minialign.training.trackers import check_available
from minialign.training.train import check_enough_examples


def load_base(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    model = load_model(cfg.model, seed=cfg.seed, cache=cfg.cache)
    check_vocab(model, tokenizer, cfg.model, cfg.tokenizer or default_tokenizer(cfg.model))
    return model



def base_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """Frozen LoRA base weights are only read: bf16 halves their memory on a GPU (adapters stay float32). Trained
    weights (full fine-tuning) stay float32 unless asked: bf16 changes the numbers (``optim.StochasticAdamW``)."""
    if cfg.base_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and not cfg.full else torch.float32
    return getattr(torch, cfg.base_dtype)



def trainable_weights(model, cfg: TrainConfig, device: torch.device):
    """Full fine-tuning trains the model's own weights, in ``base_dtype``; LoRA freezes them and adds adapters."""
    return model.to(base_dtype(cfg, device)) if cfg.full else attach_lora(model, cfg, device)



def attach_lora(model, cfg: TrainConfig, device: torch.device, targets: str | list[str] | None = None):
    """``targets``: the layers to adapt when ``--lora-targets`` alone cannot say (a reward model's head is no target)."""
    model.to(base_dtype(cfg, device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return lora.apply_lora(model, lora_config(cfg, targets), dtype=torch.float32)


def lora_config(cfg: TrainConfig, targets: str | list[str] | None = None) -> lora.LoRAConfig:
    """The adapters ``cfg`` asks for; ``targets`` as ``attach_lora`` takes them."""
    if targets is None:
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    return lora.LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.use_rslora)


def wrap_policy(model, cfg: TrainConfig, device: torch.device, cls: type[TokenLogps] = TokenLogps) -> torch.nn.Module:
    """``cls``: the wrapper that runs the body (``reward_model.RewardModel`` for a reward model)."""
    model.to(device)
    if cfg.grad_checkpointing:
        offload.checkpoint_blocks(model)
        if cfg.offload_activations:
            offload.install(model)
    policy = cls(model, cfg.loss_chunk_size or None, attention=cfg.attention)
    if cfg.compile:
        compile_policy(policy, cfg)
    return dist.wrap(policy, cfg.dist, device, transformer_blocks(policy))



def compile_policy(policy: TokenLogps, cfg: TrainConfig) -> None:
    """Compile the transformer in place (parameter names, and checkpoints, stay); see ``TokenLogps.compile_body``.


    Padding-free rows change length every batch and FlexAttention does not compile for symbolic lengths (torch
    2.11), so they compile one graph per distinct row length: round lengths coarsely (--pad-to-multiple-of 256 or more).
    """
    static = {"dynamic": False} if cfg.padding_free else {}
    policy.compile_body(scope=cfg.compile_scope, mode=cfg.compile_mode, **static)



def save_final(model, run_dir: Path, cfg: TrainConfig, tokenizer, **adapter) -> None:
    """PEFT-format adapter (LoRA) or full weights, the tokenizer, and merged weights on request; ``adapter``: extra
    ``adapters.save_adapter`` arguments (a reward model's ``task_type`` and ``modules_to_save``).


    Call it on every rank: an FSDP-sharded model is gathered whole first; rank 0 writes.
    """
    if dist.is_sharded(model):
        model = _unsharded_copy(model)
    if dist.rank() != 0:
        return
    final = run_dir / "final"
    final.mkdir(exist_ok=True)
    tokenizer.save_pretrained(str(final / "tokenizer"))
    if getattr(model, "lora_config", None) is not None:
        adapters.save_adapter(model, final / "adapter", **adapter)
        if cfg.merge:
            _save_pretrained(lora.merge_lora(copy.deepcopy(model)), final / "merged")
    else:
        _save_pretrained(model, final / "model")



def _unsharded_copy(model):
    """On rank 0, a plain model holding the whole weights of an FSDP-sharded one; None on the other ranks.


    FSDP modules can be neither deep-copied nor saved with ``save_pretrained`` (their state dict holds shards),
    so the weights are all-gathered (every rank takes part) into an empty skeleton of the same architecture.
    """
    weights = dist.gather_to_rank0(model.state_dict().items())
    buffers = dist.gather_to_rank0(model.named_buffers())  # not sharded, but non-persistent ones are not in the state dict
    if dist.rank() != 0:
        return None
    with torch.device("meta"):
        plain = type(model)(model.config)
    if getattr(model, "lora_config", None) is not None:
        lora.apply_lora(plain, model.lora_config)
    plain.load_state_dict(weights, assign=True)
    for name, buffer in buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(owner), attr, buffer)
    if getattr(model.config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain



def _save_pretrained(model, path: Path) -> None:
    with staged_dir(path) as tmp:
        model.save_pretrained(str(tmp))
        publish_dir(tmp, path)



def prologue(cfg: TrainConfig, kind: str, tokenize, *, resume: bool, overwrite: bool, clock: Stopwatch):
    """The first steps of every training recipe: each check that needs no weights (settings, run folder, model
    source, data and what it tokenizes to, what a resume changes), before anything is written; the recipe writes
    the run folder (``resume.open_run_dir``) once its model is ready. Raises ``resume.Finished`` for a finished run
    that a resume asks nothing of."""
    changed = resume_rules.resume_changes(cfg, kind) if resume else {}
    cfg.validate(dist.launched_world())
    check_available(cfg.report_to)  # a missing tracker package fails before the run folder is written
    dist.check_same_config(dataclasses.asdict(cfg))
    device = resolve_device(cfg.device)
    cfg.apply_fast(device.type, dist.world_size())
    if cfg.attention == "flex" and device.type != "cuda":
        raise UserError("--attention flex needs a CUDA device (FlexAttention has no backward on a CPU); use auto or sdpa.")
    if not cfg.full:
        lora_config(cfg).validate()
    if not resume:
        folders.check_run_dir(cfg, kind, overwrite=overwrite)
    with clock.phase("load"):
        tokenizer_name = cfg.tokenizer or default_tokenizer(cfg.model)
        tokenizer = load_tokenizer(tokenizer_name, cache=cfg.cache)
        check_model_source(cfg.model, tokenizer, tokenizer_name)
    with clock.phase("tokenize"):  # reading the data too
        train_pairs, eval_pairs = load_pairs(cfg, tokenizer)
        tok = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        held = {}
        if kind == "sft":
            tok["truncation"], held["label"] = cfg.truncation, "held-out"
        items, held_out = tokenize(train_pairs, tokenizer, **tok), tokenize(eval_pairs, tokenizer, **tok, **held)
    check_tokenized(items, tokenizer, tokenizer_name)
    if not (resume or getattr(cfg, "packing", False)):  # packed rows are counted again by the loop
        check_enough_examples(len(items), cfg, dist.world_size())
    run_dir = Path(cfg.out)
    point = resume_rules.resume_point(run_dir, resume, cfg)
    if resume:
        n = len(pack_sft(items, cfg.max_length)) if getattr(cfg, "packing", False) else len(items)
        resume_rules.check_run_length(run_dir, cfg, point, changed, n)
    _announce(cfg, kind, len(items), len(held_out), items.truncated, items.dropped + held_out.dropped)
    return run_dir, point, device, tokenizer, items, held_out


def _announce(cfg: TrainConfig, kind: str, n_train: int, n_eval: int, truncated: int, dropped: int) -> None:
    if dist.rank() != 0:
        return
    world = dist.world_size()
    method = "full fine-tuning" if cfg.full else f"LoRA r={cfg.lora_r}"
    left_out = f", {dropped} left out (train and eval): no response token fits" if dropped else ""
    print(f"minialign {kind}: {cfg.model}, {method}; {n_train} train / {n_eval} eval examples "
          f"({truncated} truncated{left_out}); global batch {cfg.batch_size} x {world} rank(s) x {cfg.grad_accum} "
          f"accum = {cfg.batch_size * world * cfg.grad_accum}; run folder {cfg.out}")



