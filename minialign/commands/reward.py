"""`minialign rm`: Bradley-Terry reward models (judges) on preference pairs, and loading them back to score text.

The model is a causal LM's transformer body with a scalar head, ``score = nn.Linear(hidden, 1, bias=False)``,
read at one position per sequence: the last token that is not EOS. That is what transformers'
``AutoModelForSequenceClassification`` computes on right-padded input when ``config.pad_token_id`` is the EOS id
(the rightmost token that is not padding), so a response's trailing EOS and a truncated response without one are
scored alike, and a saved reward model gives transformers users the same numbers. The body is the model's own
class turned into its ``*ForSequenceClassification`` (``sequence_classifier``) and runs through
``TokenLogps.body``: padding-free batches, varlen attention, ``--compile``, CUDA graphs and DDP / FSDP work as
for SFT and DPO. The loss is ``losses.rm_loss`` (TRL's RewardTrainer: optional per-row ``margin``, centring term).

Loading a finished run (``RUN`` = the ``--out`` folder) outside minialign:

* full fine-tuning (``--full``), ``RUN/final/model`` is a sequence-classification model::

      from transformers import AutoModelForSequenceClassification, AutoTokenizer
      model = AutoModelForSequenceClassification.from_pretrained("RUN/final/model")   # num_labels=1, pad = EOS
      tok = AutoTokenizer.from_pretrained("RUN/final/tokenizer")

* LoRA (the default), ``RUN/final/adapter`` is a PEFT adapter (task_type SEQ_CLS, the head in
  ``modules_to_save=["score"]``) for the base model the run was trained from (the same weights: for
  ``smollm2-135m-instruct`` that is the dequantised GGUF, which minialign's ``load_model`` loads)::

      from peft import PeftModel
      base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1, pad_token_id=tok.eos_token_id)
      model = PeftModel.from_pretrained(base, "RUN/final/adapter").merge_and_unload()

  Score ``prompt + response + EOS`` (tokenized as two parts, as training does) with ``model(ids).logits[:, 0]``;
  inside minialign, ``load_judge(RUN).score(prompts, responses)`` does exactly that.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from minialign.base.errors import UserError
from minialign.commands import common
from minialign.commands import resume as resume_rules
from minialign.config.schema import RMConfig
from minialign.data import flat_sizes, sequence_lengths, tokenize_pairs
from minialign.modeling.blocks import check_fast_path
from minialign.modeling.reward_model import HEAD, RewardModel, sequence_classifier
from minialign.training.reward_task import RMTask, collate_rm
from minialign.training.timing import Stopwatch, write_summary
from minialign.training.train import train

# ----------------------------------------------------------------------------- model


# ----------------------------------------------------------------------------- batches


# ----------------------------------------------------------------------------- task


# ----------------------------------------------------------------------------- recipe


def make_trainable(model: nn.Module, cfg: RMConfig, device: torch.device) -> nn.Module:
    """Full fine-tuning trains every weight (in ``base_dtype``); LoRA adds adapters to the body's linear layers and
    trains the score head in full, in float32."""
    if cfg.full:
        return common.trainable_weights(model, cfg, device)
    if cfg.lora_targets == "all-linear":  # lora's own "all-linear" knows the LM heads only, not the score head
        targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != HEAD]
    else:
        targets = [t.strip() for t in cfg.lora_targets.split(",")]
        if HEAD in targets:
            raise UserError(f"--lora-targets names '{HEAD}', the reward head, which is always trained in full; "
                            "list only body layers.")
    common.attach_lora(model, cfg, device, targets)
    model.score.float().requires_grad_(True)
    return model


@resume_rules.unless_finished
def rm(cfg: RMConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    clock = Stopwatch()
    run_dir, point, device, tokenizer, pairs, held_out = common.prologue(cfg, "rm", tokenize_pairs, resume=resume,
                                                                           overwrite=overwrite, clock=clock)
    eos = tokenizer.eos_token_id
    with clock.phase("load"):
        lm = common.load_base(cfg, tokenizer)
        check_fast_path(cfg, lm, device)  # an architecture the fast path cannot honour falls back (or is refused)
        model = sequence_classifier(lm, eos, cfg.seed)
        make_trainable(model, cfg, device)
        policy = common.wrap_policy(model, cfg, device, cls=RewardModel)
    share = cfg.padding_free and cfg.share_prompt
    collate_items = functools.partial(collate_rm, pad_id=tokenizer.pad_token_id, eos_id=eos, flat=cfg.padding_free,
                                      share_prompt=share, pad_to_multiple_of=cfg.pad_to_multiple_of or None)
    bs = cfg.batch_size
    eval_batches = [collate_items(held_out[i : i + bs]) for i in range(0, len(held_out), bs)]
    sizes = [(n, 0) for n, _ in flat_sizes(pairs, share_prompt=share)] if cfg.padding_free else None
    resume_rules.open_run_dir(cfg, "rm", resume=resume, overwrite=overwrite)
    last = train(policy, RMTask(cfg.center_rewards_coefficient), range(len(pairs)),
                 lambda idx: collate_items([pairs[i] for i in idx]), cfg, run_dir, eval_batches=eval_batches,
                 lengths=sequence_lengths(pairs), sizes=sizes, resume_from=point)
    with clock.phase("save"):
        # a sequence-classification folder, or a PEFT SEQ_CLS adapter whose score head is in modules_to_save
        common.save_final(model, run_dir, cfg, tokenizer, task_type="SEQ_CLS", modules_to_save=(HEAD,))
    last.setdefault("summary", {}).update(n_train=len(pairs), n_eval=len(held_out))
    write_summary(run_dir, last, clock)
    return run_dir


# ----------------------------------------------------------------------------- judge
