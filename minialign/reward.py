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

import dataclasses
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minialign import lora, losses, recipes
from minialign import resume as resume_rules
from minialign.config import RMConfig
from minialign.data import PreferencePair, collate_pairs, collate_sft, flat_sizes, sequence_lengths, tokenize_pairs
from minialign.data.chat import to_chat_format
from minialign.data.tokenize import tokenize_sft
from minialign.errors import UserError
from minialign.models import check_fast_path, load_model, load_tokenizer
from minialign.tasks import TokenLogps, varlen_args
from minialign.timing import Stopwatch, write_summary
from minialign.train import train

HEAD = "score"  # transformers' *ForSequenceClassification head name


# ----------------------------------------------------------------------------- model


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


# ----------------------------------------------------------------------------- batches


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


def collate_rm(pairs, *, pad_id: int, eos_id: int, pad_to_multiple_of: int | None = None, flat: bool = False,
               share_prompt: bool = False) -> dict:
    """A DPO-layout batch (chosen rows, then rejected rows) with each sequence's ``pool_index`` and each pair's
    ``margin`` ``[B]``, and no targets: a reward model reads one position per sequence, no token log-probs."""
    batch = collate_pairs(pairs, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of, flat=flat,
                          share_prompt=flat and share_prompt)
    batch["targets"].fill_(-100)
    batch["n_targets"] = 0
    batch["pool_index"] = pooled_index(batch, eos_id)
    batch["margin"] = torch.tensor([getattr(p, "margin", 0.0) for p in pairs], dtype=torch.float32)
    return batch


# ----------------------------------------------------------------------------- task


class RMTask:
    """Bradley-Terry: chosen and rejected sequences go through the model in one forward pass; units are pairs."""

    name = "rm"

    def __init__(self, center_coef: float = 0.0):
        self.center_coef = center_coef

    def units(self, batch: dict) -> int:
        return batch["n_pairs"]

    def loss(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = batch["n_pairs"]
        rewards = run_rewards(policy, batch)
        chosen, rejected = rewards[:b], rewards[b:]
        loss = losses.rm_loss(chosen, rejected, batch.get("margin"), self.center_coef)
        c, r = chosen.detach(), rejected.detach()
        return loss, {"loss": loss.detach(), "accuracy": (c > r).float().sum(), "rewards/chosen": c.sum(),
                      "rewards/rejected": r.sum(), "margin": (c - r).sum()}


# ----------------------------------------------------------------------------- recipe


def make_trainable(model: nn.Module, cfg: RMConfig, device: torch.device) -> nn.Module:
    """Full fine-tuning trains every weight (in ``base_dtype``); LoRA adds adapters to the body's linear layers and
    trains the score head in full, in float32."""
    if cfg.full:
        return recipes.trainable_weights(model, cfg, device)
    if cfg.lora_targets == "all-linear":  # lora's own "all-linear" knows the LM heads only, not the score head
        targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != HEAD]
    else:
        targets = [t.strip() for t in cfg.lora_targets.split(",")]
        if HEAD in targets:
            raise UserError(f"--lora-targets names '{HEAD}', the reward head, which is always trained in full; "
                            "list only body layers.")
    recipes.attach_lora(model, cfg, device, targets)
    model.score.float().requires_grad_(True)
    return model


@resume_rules.unless_finished
def rm(cfg: RMConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    clock = Stopwatch()
    run_dir, point, device, tokenizer, pairs, held_out = recipes._prologue(cfg, "rm", tokenize_pairs, resume=resume,
                                                                           overwrite=overwrite, clock=clock)
    eos = tokenizer.eos_token_id
    with clock.phase("load"):
        lm = recipes.load_base(cfg, tokenizer)
        check_fast_path(cfg, lm, device)  # an architecture the fast path cannot honour falls back (or is refused)
        model = sequence_classifier(lm, eos, cfg.seed)
        make_trainable(model, cfg, device)
        policy = recipes.wrap_policy(model, cfg, device, cls=RewardModel)
    share = cfg.padding_free and cfg.share_prompt
    collate_items = functools.partial(collate_rm, pad_id=tokenizer.pad_token_id, eos_id=eos, flat=cfg.padding_free,
                                      share_prompt=share, pad_to_multiple_of=cfg.pad_to_multiple_of or None)
    bs = cfg.batch_size
    eval_batches = [collate_items(held_out[i : i + bs]) for i in range(0, len(held_out), bs)]
    sizes = [(n, 0) for n, _ in flat_sizes(pairs, share_prompt=share)] if cfg.padding_free else None
    recipes.open_run_dir(cfg, "rm", resume=resume, overwrite=overwrite)
    last = train(policy, RMTask(cfg.center_rewards_coefficient), range(len(pairs)),
                 lambda idx: collate_items([pairs[i] for i in idx]), cfg, run_dir, eval_batches=eval_batches,
                 lengths=sequence_lengths(pairs), sizes=sizes, resume_from=point)
    with clock.phase("save"):
        # a sequence-classification folder, or a PEFT SEQ_CLS adapter whose score head is in modules_to_save
        recipes.save_final(model, run_dir, cfg, tokenizer, task_type="SEQ_CLS", modules_to_save=(HEAD,))
    last.setdefault("summary", {}).update(n_train=len(pairs), n_eval=len(held_out))
    write_summary(run_dir, last, clock)
    return run_dir


# ----------------------------------------------------------------------------- judge


@dataclasses.dataclass
class Judge:
    """A trained reward model ready to score text. ``model`` is a transformers *ForSequenceClassification (LoRA
    merged in); ``info`` says what it was trained on and how well it ranks held-out pairs."""

    model: nn.Module
    tokenizer: object
    info: dict
    config: RMConfig
    device: torch.device

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """``[N]`` float32 rewards (CPU) of each ``prompt + response``, tokenized as training tokenizes a pair's
        sequence: prompt and response apart, EOS appended, truncated to the run's lengths. Prompts are in the
        dataset's form ("\\n\\nHuman: ...\\n\\nAssistant:"); a judge trained with --chat-template rewrites them
        into the chat template, as training did (a prompt without HH turns is taken as already formatted)."""
        if len(prompts) != len(responses):
            raise UserError(f"score() needs one response per prompt; got {len(prompts)} prompts and "
                            f"{len(responses)} responses.")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1 (got {batch_size}).")
        if not prompts:
            return torch.zeros(0)
        items = self._tokenize(list(prompts), list(responses))
        order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids) + len(items[i].response_ids))
        out = torch.zeros(len(items))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        pad = self.model.config.pad_token_id
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch = collate_sft([items[i] for i in chunk], pad_id=pad)
            with autocast:
                logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device), use_cache=False).logits
            out[chunk] = logits[:, 0].float().cpu()
        return out

    def _tokenize(self, prompts: list[str], responses: list[str]):
        pairs = [PreferencePair(p, r, r) for p, r in zip(prompts, responses)]
        if self.config.chat_template:
            hh = [i for i, p in enumerate(prompts) if "\n\nHuman:" in p]
            formatted = to_chat_format([pairs[i] for i in hh], self.tokenizer)
            for i, pair in zip(hh, formatted):
                pairs[i] = pair
            pairs = [PreferencePair(p.prompt, p.chosen.strip(), p.chosen.strip()) for p in pairs]
        return tokenize_sft(pairs, self.tokenizer, max_length=self.config.max_length,
                            max_prompt_length=self.config.max_prompt_length)


_JUDGES: dict[tuple, Judge] = {}


def load_judge(path: str | Path, device: str | torch.device = "cpu", cache: bool = True) -> Judge:
    """The reward model of a finished ``minialign rm`` run folder, on ``device`` (eval mode, no gradients).

    ``cache``: a second call for the same folder, device and final weights returns the same Judge.
    """
    run_dir = Path(path)
    _check_rm_run(run_dir)
    final = run_dir / "final"
    if not final.is_dir():
        raise UserError(f"The reward-model run {run_dir} has no final/ folder: it has not finished. Resume it with "
                        f"`minialign rm --resume {run_dir}`, then pass it again.")
    device = torch.device(device)
    key = (str(run_dir.resolve()), str(device), final.stat().st_mtime_ns)
    if cache and key in _JUDGES:
        return _JUDGES[key]
    cfg = recipes.load_run_config(run_dir, RMConfig)
    tokenizer = load_tokenizer(str(final / "tokenizer"))
    model = _load_model(run_dir, cfg, tokenizer).to(device).eval().requires_grad_(False)
    summary = _read_json(run_dir / "summary.json")
    info = {"run_dir": str(run_dir), "model": cfg.model, "dataset": cfg.dataset, "train_rows": cfg.train_rows,
            "eval_data": cfg.eval_data, "eval_rows": cfg.eval_rows, "chat_template": cfg.chat_template,
            "heldout_accuracy": summary.get("eval", {}).get("eval/accuracy"), "n_train": summary.get("n_train")}
    judge = Judge(model, tokenizer, info, cfg, device)
    if cache:
        _JUDGES[key] = judge
    return judge


def _check_rm_run(run_dir: Path) -> None:
    kind_file = run_dir / "kind"
    kind = kind_file.read_text().strip() if kind_file.is_file() else None
    if kind == "rm":
        return
    if not run_dir.exists():
        what = "does not exist"
    elif kind:
        what = f"is a `minialign {kind}` run folder, not a reward model"
    elif (run_dir / "config.json").is_file():
        what = "is a model folder, not a `minialign rm` run folder"
    else:
        what = "is not a minialign run folder"
    raise UserError(f"{run_dir} {what}. A judge is the --out folder of a finished `minialign rm` run (it holds "
                    "kind = rm, config.yaml and final/); train one with `minialign rm --out DIR ...` and pass DIR.")


def _load_model(run_dir: Path, cfg: RMConfig, tokenizer) -> nn.Module:
    final = run_dir / "final"
    if (final / "model").is_dir():
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(str(final / "model"), dtype=torch.float32)
    if (final / "adapter").is_dir():
        model = sequence_classifier(load_model(cfg.model, seed=cfg.seed), tokenizer.eos_token_id, cfg.seed)
        return lora.merge_lora(lora.load_adapter(model, final / "adapter", modules_to_save=(HEAD,)))
    raise UserError(f"{final} holds neither model/ nor adapter/: the run did not finish. Resume it with "
                    f"`minialign rm --resume {run_dir}`.")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


__all__ = ["Judge", "RMTask", "RewardModel", "collate_rm", "load_judge", "pooled_index", "rm", "sequence_classifier"]
