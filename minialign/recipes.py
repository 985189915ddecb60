"""`minialign sft` and `minialign dpo`: build model, data and task from a config, train, save.

Each recipe is a straight line: run folder -> tokenizer and model -> data -> task -> ``train.train`` ->
final adapter (PEFT format) or model. The loop itself lives in ``train.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from functools import partial
from pathlib import Path

import torch
import yaml

from minialign import checkpoint, dist, lora
from minialign.config import DPOConfig, SFTConfig, TrainConfig
from minialign.data import (
    batch_indices,
    collate_packed,
    collate_pairs,
    collate_sft,
    flat_sizes,
    load_preference_pairs,
    pack_sft,
    sequence_lengths,
    split_pairs,
    tokenize_pairs,
    tokenize_sft,
)
from minialign.data.chat import to_chat_format
from minialign.errors import UserError
from minialign.models import (BUILTIN_CONFIGS, SMOLLM2, check_fast_path, check_vocab, load_model, load_tokenizer,
                              refuse_reward_model)
from minialign.presets import build, save_config
from minialign.tasks import DPOTask, SFTTask, TokenLogps, adapter_reference, cached_reference, frozen_copy, frozen_reference, reference_table
from minialign.timing import Stopwatch, write_summary
from minialign.train import check_enough_examples, train, use_varlen

CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------- run folder


def prepare_run_dir(cfg: TrainConfig, kind: str, *, overwrite: bool) -> Path:
    """Create the run folder; refuse to reuse one holding another run unless told to overwrite."""
    run_dir = Path(cfg.out)
    existing = run_dir / CONFIG_FILE
    if existing.exists() and not overwrite:
        old = yaml.safe_load(existing.read_text()) or {}
        same = old == dataclasses.asdict(cfg)
        raise UserError(
            f"{run_dir} already holds a {'run with this config' if same else 'run with a different config'}. "
            f"Continue it with `minialign {kind} --resume {run_dir}`, start over with --overwrite, or choose another --out."
        )
    dist.barrier()  # every rank has checked before rank 0 writes
    if overwrite and dist.rank() == 0:
        for name in ("checkpoints", "final", "metrics.jsonl", "summary.json", "ref_logps.safetensors", CONFIG_FILE):
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if dist.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
        (run_dir / "kind").write_text(kind)
    dist.barrier()
    return run_dir


def load_run_config(run_dir: Path, cls):
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a minialign run folder (no {CONFIG_FILE}).")
    data = yaml.safe_load(path.read_text()) or {}
    return build(cls, {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu.")
    if name == "cuda" and dist.enabled():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def default_tokenizer(model: str) -> str:
    if model in BUILTIN_CONFIGS and (model == "tiny" or model.startswith("tiny-")):
        return "demo"
    if model in BUILTIN_CONFIGS:
        return SMOLLM2 if BUILTIN_CONFIGS[model]["model_type"] == "llama" else "EleutherAI/pythia-70m"
    return model


# ----------------------------------------------------------------------------- data


def load_pairs(cfg: TrainConfig, tokenizer):
    """Training and held-out pairs. A local source without its own eval set or rows is split 90/10."""
    train_pairs = load_preference_pairs(cfg.dataset, split=cfg.train_split, data_dir=cfg.data_dir or None,
                                        rows=cfg.train_rows or None, limit=cfg.limit or None)
    eval_source = cfg.eval_data or cfg.dataset
    if single_split(cfg):
        train_pairs, eval_pairs = split_pairs(train_pairs, 0.1, cfg.seed)
        if dist.rank() == 0:  # nothing on the command line asked for it: say so
            cap = f"; --eval-limit scores {cfg.eval_limit}" if cfg.eval_limit < len(eval_pairs) else ""
            print(f"minialign: {cfg.dataset} is one local source without --eval-data or --eval-rows: 10% of its pairs "
                  f"are held out for evaluation, {len(eval_pairs)} chosen at random (--seed {cfg.seed}{cap}), and "
                  f"{len(train_pairs)} are left to train on.")
        eval_pairs = eval_pairs[: cfg.eval_limit]
    else:
        eval_pairs = load_preference_pairs(eval_source, split=cfg.eval_split, data_dir=cfg.data_dir or None,
                                           rows=cfg.eval_rows or None, limit=cfg.eval_limit or None)
    if cfg.chat_template:
        train_pairs, eval_pairs = to_chat_format(train_pairs, tokenizer), to_chat_format(eval_pairs, tokenizer)
    return train_pairs, eval_pairs


def single_split(cfg: TrainConfig) -> bool:
    """One local source with neither its own eval data nor eval rows: ``load_pairs`` holds 10% of it out."""
    return not cfg.eval_data and not cfg.eval_rows and _is_files(cfg.dataset)


def _is_files(source: str) -> bool:
    return source != "demo" and (Path(source).exists() or any(c in source for c in "*?[") or "," in source)


# ----------------------------------------------------------------------------- model


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
    if targets is None:
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    model.to(base_dtype(cfg, device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        config = lora.LoRAConfig(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.use_rslora)
        return lora.apply_lora(model, config, dtype=torch.float32)


def wrap_policy(model, cfg: TrainConfig, device: torch.device, cls: type[TokenLogps] = TokenLogps) -> torch.nn.Module:
    """``cls``: the wrapper that runs the body (``reward.RewardModel`` for a reward model)."""
    model.to(device)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = cls(model, cfg.loss_chunk_size or None, attention=cfg.attention)
    if cfg.compile:
        compile_policy(policy, cfg)
    return dist.wrap(policy, cfg.dist, device)


def compile_policy(policy: TokenLogps, cfg: TrainConfig) -> None:
    """Compile the transformer in place (parameter names, and checkpoints, stay); see ``TokenLogps.compile_body``.

    Padding-free rows change length every batch and FlexAttention does not compile for symbolic lengths (torch
    2.11), so they compile one graph per distinct row length: round lengths coarsely (--pad-to-multiple-of 256 or more).
    """
    static = {"dynamic": False} if cfg.padding_free else {}
    policy.compile_body(scope=cfg.compile_scope, mode=cfg.compile_mode, **static)


def save_final(model, run_dir: Path, cfg: TrainConfig, tokenizer, **adapter) -> None:
    """PEFT-format adapter (LoRA) or full weights, the tokenizer, and merged weights on request; ``adapter``: extra
    ``lora.save_adapter`` arguments (a reward model's ``task_type`` and ``modules_to_save``).

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
        lora.save_adapter(model, final / "adapter", **adapter)
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
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


# ----------------------------------------------------------------------------- recipes


def _prologue(cfg: TrainConfig, kind: str, tokenize, *, resume: bool, overwrite: bool, clock: Stopwatch):
    """The first steps of both recipes. Tokenizer and data are read before the run folder is written, so a
    bad source or setting leaves nothing behind."""
    cfg.validate()
    dist.check_same_config(dataclasses.asdict(cfg))
    device = resolve_device(cfg.device)
    cfg.apply_fast(device.type, dist.world_size())
    if cfg.attention == "flex" and device.type != "cuda":
        raise UserError("--attention flex needs a CUDA device (FlexAttention has no backward on a CPU); use auto or sdpa.")
    with clock.phase("load"):
        tokenizer = load_tokenizer(cfg.tokenizer or default_tokenizer(cfg.model), cache=cfg.cache)
    with clock.phase("tokenize"):  # reading the data too
        train_pairs, eval_pairs = load_pairs(cfg, tokenizer)
        tok = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        items, held_out = tokenize(train_pairs, tokenizer, **tok), tokenize(eval_pairs, tokenizer, **tok)
    if not (resume or getattr(cfg, "packing", False)):  # packed rows are counted again by the loop
        check_enough_examples(len(items), cfg, dist.world_size())
    run_dir = Path(cfg.out) if resume else prepare_run_dir(cfg, kind, overwrite=overwrite)
    point = _resume_point(run_dir, resume, cfg)
    _announce(cfg, kind, len(items), len(held_out), items.truncated)
    return run_dir, point, device, tokenizer, items, held_out


def sft(cfg: SFTConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    clock = Stopwatch()
    run_dir, point, device, tokenizer, examples, held_out = _prologue(cfg, "sft", tokenize_sft, resume=resume,
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
        collate = lambda idx: collate_sft([examples[i] for i in idx], pad_id=pad, pad_to_multiple_of=cfg.pad_to_multiple_of or None,
                                          flat=cfg.padding_free)
        n_items, lengths = len(examples), None
    eval_batches = [collate_sft(held_out[i : i + cfg.batch_size], pad_id=pad, flat=cfg.padding_free)
                    for i in range(0, len(held_out), cfg.batch_size)]
    sizes = flat_sizes(examples) if cfg.padding_free else None
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
        return lora.merge_lora(lora.load_adapter(model, final / "adapter"))
    model = load_base(cfg, tokenizer)
    if cfg.adapter:
        model = lora.merge_lora(lora.load_adapter(model, cfg.adapter))
    return model


def dpo(cfg: DPOConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    if cfg.sft and not resume:
        refuse_reward_model(cfg.sft, "an SFT run (--sft)")
        sft_cfg = load_run_config(Path(cfg.sft), SFTConfig)
        cfg.model = sft_cfg.model
        cfg.tokenizer = cfg.tokenizer or str(Path(cfg.sft) / "final" / "tokenizer")
    clock = Stopwatch()
    run_dir, point, device, tokenizer, pairs, held_out = _prologue(cfg, "dpo", tokenize_pairs, resume=resume,
                                                                   overwrite=overwrite, clock=clock)
    with clock.phase("load"):
        model = dpo_start_model(cfg, tokenizer)
    check_fast_path(cfg, model, device)
    pad = tokenizer.pad_token_id
    # Training pairs, then held-out pairs: one index space, so a precomputed reference table covers both.
    both = [*pairs, *held_out]
    collate = lambda idx: collate_pairs([both[i] for i in idx], pad_id=pad, index=idx, pad_to_multiple_of=cfg.pad_to_multiple_of or None,
                                        flat=cfg.padding_free, share_prompt=cfg.padding_free and cfg.share_prompt)
    task = DPOTask(None, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma,
                   rpo_alpha=cfg.rpo_alpha)
    reference = None  # LoRA: the policy with its adapters off (below)
    with clock.phase("load"):
        if cfg.full:
            ref_policy = TokenLogps(frozen_copy(model, device), cfg.loss_chunk_size or None, attention=cfg.attention)
            if cfg.compile:
                compile_policy(ref_policy, cfg)
            reference = frozen_reference(ref_policy, task.normalise)
        trainable_weights(model, cfg, device)
        policy = wrap_policy(model, cfg, device)
    if reference is None:
        reference = adapter_reference(policy, task.normalise)
    if cfg.precompute_ref and cfg.loss_type != "simpo":
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


def _reference_cache(run_dir: Path, policy, reference, collate, n: int, cfg: TrainConfig, device) -> torch.Tensor:
    """Reference log-probs of every training and held-out pair, computed once and kept in the run folder.

    Under torchrun each rank scores its share of the pairs and a sum over ranks (of tables that are zero
    outside each share) leaves every rank with the whole table. Every rank runs the same number of batches
    (FSDP gathers weights inside each forward), so one with nothing left in the last batch scores pair 0 again
    and drops it.
    """
    from safetensors.torch import load_file, save_file

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
        tmp = path.with_suffix(".tmp")
        save_file({"logps": table}, str(tmp))
        tmp.replace(path)
    return table


def _resume_point(run_dir: Path, resume: bool, cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from; ``cfg``'s per-device batch is fitted to the global batch it was trained with."""
    if not resume:
        return None
    point = checkpoint.latest_checkpoint(run_dir)
    if point is None:
        if dist.rank() == 0:
            print(f"minialign: {run_dir} has no complete checkpoint yet; starting from step 0.")
        return None
    _keep_global_batch(cfg, point)
    return point


def _keep_global_batch(cfg: TrainConfig, point: Path) -> None:
    """A run resumed on another number of processes keeps its global batch: the per-device batch is rescaled."""
    saved = checkpoint.read_progress(point).get("global_batch", 0)
    world = dist.world_size()
    if not saved or saved == cfg.batch_size * world * cfg.grad_accum:
        return
    per_device, rest = divmod(saved, world * cfg.grad_accum)
    if rest or not per_device:
        raise UserError(
            f"{point} was trained with a global batch of {saved} examples, which {world} process(es) x {cfg.grad_accum} "
            f"accumulation cannot split evenly; resume with a number of processes that divides {saved // cfg.grad_accum}."
        )
    if dist.rank() == 0:
        print(f"minialign: resuming with {world} process(es): per-device batch {cfg.batch_size} -> {per_device}, "
              f"keeping the global batch of {saved}.")
    cfg.batch_size = per_device


def _announce(cfg: TrainConfig, kind: str, n_train: int, n_eval: int, truncated: int) -> None:
    if dist.rank() != 0:
        return
    world = dist.world_size()
    method = "full fine-tuning" if cfg.full else f"LoRA r={cfg.lora_r}"
    print(f"minialign {kind}: {cfg.model}, {method}; {n_train} train / {n_eval} eval examples "
          f"({truncated} truncated); global batch {cfg.batch_size} x {world} rank(s) x {cfg.grad_accum} accum "
          f"= {cfg.batch_size * world * cfg.grad_accum}; run folder {cfg.out}")


def resume_config(run_dir: Path, cls) -> TrainConfig:
    cfg = load_run_config(run_dir, cls)
    cfg.out = str(run_dir)
    return cfg


__all__ = ["sft", "dpo", "resume_config", "prepare_run_dir", "load_run_config", "partial", "write_summary"]
