"""Judges: a finished `minialign rm` run loaded back to score text (``load_judge(RUN).score(prompts, answers)``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from minialign.base.errors import UserError
from minialign.base.files import read_json
from minialign.config.presets import load_run_config
from minialign.config.schema import RMConfig
from minialign.data.batching import collate_sft
from minialign.data.chat import to_chat_format
from minialign.data.sources import PreferencePair
from minialign.data.tokenize import tokenize_sft
from minialign.modeling import adapters, lora
from minialign.modeling.models import load_model, load_tokenizer
from minialign.modeling.reward_model import HEAD, sequence_classifier


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
    check_rm_run(run_dir)
    final = run_dir / "final"
    if not final.is_dir():
        raise UserError(f"The reward-model run {run_dir} has no final/ folder: it has not finished. Resume it with "
                        f"`minialign rm --resume {run_dir}`, then pass it again.")
    device = torch.device(device)
    key = (str(run_dir.resolve()), str(device), final.stat().st_mtime_ns)
    if cache and key in _JUDGES:
        return _JUDGES[key]
    cfg = load_run_config(run_dir, RMConfig)
    tokenizer = load_tokenizer(str(final / "tokenizer"))
    model = load_reward_model(run_dir, cfg, tokenizer).to(device).eval().requires_grad_(False)
    summary = read_json(run_dir / "summary.json")
    info = {"run_dir": str(run_dir), "model": cfg.model, "dataset": cfg.dataset, "train_rows": cfg.train_rows,
            "eval_data": cfg.eval_data, "eval_rows": cfg.eval_rows, "chat_template": cfg.chat_template,
            "heldout_accuracy": summary.get("eval", {}).get("eval/accuracy"), "n_train": summary.get("n_train")}
    judge = Judge(model, tokenizer, info, cfg, device)
    if cache:
        _JUDGES[key] = judge
    return judge



def check_rm_run(run_dir: Path) -> None:
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



def load_reward_model(run_dir: Path, cfg: RMConfig, tokenizer) -> nn.Module:
    final = run_dir / "final"
    if (final / "model").is_dir():
        from transformers import AutoModelForSequenceClassification


        return AutoModelForSequenceClassification.from_pretrained(str(final / "model"), dtype=torch.float32)
    if (final / "adapter").is_dir():
        model = sequence_classifier(load_model(cfg.model, seed=cfg.seed), tokenizer.eos_token_id, cfg.seed)
        return lora.merge_lora(adapters.load_adapter(model, final / "adapter", modules_to_save=(HEAD,)))
    raise UserError(f"{final} holds neither model/ nor adapter/: the run did not finish. Resume it with "
                    f"`minialign rm --resume {run_dir}`.")
