"""The reward model: a causal LM body turned into its sequence-classification class, with a scalar ``score``
head read at each sequence's last non-EOS token (see ``commands/reward.py`` for the training command)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from minialign.base.errors import UserError
from minialign.modeling.policy import TokenLogps, varlen_args

HEAD = "score"  # transformers' *ForSequenceClassification head name



def sequence_classifier(lm: nn.Module, pad_id: int, seed: int = 0) -> nn.Module:
    """``lm``'s own *ForSequenceClassification (num_labels 1, pad = ``pad_id``, the EOS id) around ``lm``'s body.


    The body module is reused as it is (no copy; the output head is dropped); the new head starts as transformers
    starts one, normal with the config's ``initializer_range``, drawn from ``seed``.
    """
    from transformers import AutoModelForSequenceClassification


    config = lm.config
    config.num_labels, config.pad_token_id = 1, pad_id
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:
        raise UserError(f"transformers has no sequence-classification model for {type(config).__name__} "
                        f"({exc}); a reward model needs one (Llama, GPT-NeoX, Qwen, ... have it).") from None
    model.config = config  # the body's own config object: attention switches reach both
    setattr(model, model.base_model_prefix, lm.base_model)
    hidden = config.get_text_config().hidden_size
    head = torch.empty(1, hidden, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.normal_(0.0, getattr(config, "initializer_range", 0.02))
    model.score = nn.Linear(hidden, 1, bias=False)
    model.score.weight = nn.Parameter(head)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{type(model).__name__} has weights beyond its body and score head ({left[:3]}); "
                        "minialign cannot build a reward model from it.")
    return model



class RewardModel(TokenLogps):
    """Wraps a *ForSequenceClassification so that its forward returns ``[S]`` float32 rewards at given positions.


    The body is ``TokenLogps.body`` (padded, padding-free, packed or shared-prompt rows; compiled or not), so the
    reward model trains on the same fast path as the policy. The head reads only the pooled positions, in float32.
    """


    def forward(self, input_ids, attention_mask, position_ids, pool_index, doc_ids=None, prefix_ids=None,
                varlen: tuple | None = None):
        body = functools.partial(self.compiled_body, self) if self.compiled_body else self.body
        hidden = body(input_ids, attention_mask, position_ids, doc_ids, prefix_ids, varlen)
        pooled = hidden.flatten(0, 1).index_select(0, pool_index)
        with torch.autocast(pooled.device.type, enabled=False):
            return F.linear(pooled.float(), self.model.score.weight.float()).squeeze(-1)



def run_rewards(policy: nn.Module, batch: dict) -> torch.Tensor:
    return policy(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["pool_index"],
                  batch.get("doc_ids"), batch.get("prefix_ids"), varlen_args(batch))



def pooled_index(batch: dict, eos_id: int) -> torch.Tensor:
    """``[S]`` flat position of each sequence's last token that is not EOS (its first token if all are), on the host.


    Padded rows ``[S, T]``: row-major positions. Padding-free rows ``[1, T]``: sequence ``d`` is ``doc_ids == d``;
    with shared prompts (``prefix_ids``) a sequence whose branch is all EOS falls back into its prompt, whose hidden
    states are those of the unshared sequence (attention is causal).
    """
    ids = batch["input_ids"]
    if "n_sequences" not in batch:
        rows, length = ids.shape
        keep = (batch["attention_mask"] > 0) & (ids != eos_id)
        last = (torch.arange(length) * keep).amax(1)  # 0 when none is kept, as transformers' argmax
        return last + torch.arange(rows) * length
    n, ids, doc = batch["n_sequences"], ids[0], batch["doc_ids"][0]
    pos, end = torch.arange(len(doc)), len(doc)
    docs = int(doc.max()) + 1
    real = doc >= 0


    def reduce(mask: torch.Tensor, how: str, fill: int) -> torch.Tensor:
        return torch.full((docs,), fill, dtype=torch.long).scatter_reduce(0, doc[mask], pos[mask], how)


    first, last = reduce(real, "amin", end), reduce(real & (ids != eos_id), "amax", -1)
    if "prefix_ids" in batch:  # a branch of only EOS: the prompt's last non-EOS token, else the prompt's first
        prompt = batch["prefix_ids"][0][first[:n].clamp(max=end - 1)]
        last[:n] = torch.where(last[:n] >= 0, last[:n], last[prompt])  # -1 where the prompt has none either
        first[:n] = torch.minimum(first[:n], first[prompt])  # an empty shared prompt has first = end
    return torch.where(last[:n] >= 0, last[:n], first[:n])
