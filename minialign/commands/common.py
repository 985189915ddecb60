"""The set-up every training command shares (sft, dpo, rm, online): run folder, model, adapters, wrapping, saving,
resume. Public, so each command reads as a straight line of these steps."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import torch
import yaml

from minialign.base import dist
from minialign.base.devices import resolve_device
from minialign.base.errors import UserError
from minialign.base.files import publish_dir, staged_dir
from minialign.config.presets import CONFIG_FILE, load_run_config, save_config
from minialign.config.schema import TrainConfig
from minialign.data.splits import load_pairs
from minialign.modeling import adapters, lora
from minialign.modeling.blocks import transformer_blocks
from minialign.modeling.models import check_vocab, default_tokenizer, load_model, load_tokenizer
from minialign.modeling.policy import TokenLogps
from minialign.training import checkpoint
from minialign.training.timing import Stopwatch
from minialign.training.trackers import check_available
from minialign.training.train import check_enough_examples


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
    """``cls``: the wrapper that runs the body (``reward_model.RewardModel`` for a reward model)."""
    model.to(device)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    """The first steps of both recipes. Tokenizer and data are read before the run folder is written, so a
    bad source or setting leaves nothing behind."""
    cfg.validate(dist.launched_world())
    check_available(cfg.report_to)  # a missing tracker package fails before the run folder is written
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
