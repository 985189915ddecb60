"""One held-out evaluator for every trainer in ``bench_e2e.py``, so their accuracies can be compared.

Each trainer reports its own held-out metrics, but they are not the same numbers: TRL cuts sequences its own way,
drops pairs whose prompt fills ``max_length``, and averages per batch. Here the result of a run (a PEFT-format
adapter, or a full model written by ``save_pretrained``) is scored with minialign's own code on the same tokenized
held-out pairs, whichever trainer made it:

* DPO: policy = base + adapter (or the saved full model), reference = the base model (for LoRA, the same model with
  its adapter off) -> ``evaluate.pair_logps`` and ``evaluate.preference_metrics`` (reward accuracy and margin,
  policy accuracy = the policy alone prefers the chosen response, reference accuracy);
* SFT: mean negative log-likelihood per response token (``evaluate.heldout_loss``), of the result and of the base,
  and the result's per-example sums (``evaluate.heldout_nll``), from which ``e2e_table`` puts a paired bootstrap
  interval on the difference between two results.

Run after all timed runs, one process per result, not timed: ``python benchmarks/e2e_heldout.py --task dpo
--model M --tokenizer T --data FILE --eval-rows 0:300 (--adapter DIR | --model-dir DIR) --out-json PATH``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["dpo", "sft"], required=True)
    p.add_argument("--model", required=True, help="the base model the run started from (load_model name or path)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--eval-rows", default="0:300")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="a PEFT-format LoRA adapter directory")
    which.add_argument("--model-dir", help="a full model written by save_pretrained")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="the built-in models' random init (the runs' --seed)")
    p.add_argument("--chat-template", action="store_true", help="the run trained on chat-template text")
    p.add_argument("--sft-run", default="", help="a DPO run that started from this minialign SFT run folder: the "
                   "base (and reference) is that run's merged model, not --model")
    p.add_argument("--out-json", required=True)
    return p.parse_args(argv)


def score(args: argparse.Namespace) -> dict:
    """The held-out metrics of one trained result (see the module docstring)."""
    from minialign.data import load_preference_pairs, tokenize_pairs, tokenize_sft
    from minialign.evaluation.evaluate import heldout_loss, heldout_nll, pair_logps, pooled_loss, preference_metrics
    from minialign.modeling import adapters, lora
    from minialign.modeling.models import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(args.tokenizer)
    pairs = load_preference_pairs(args.data, rows=args.eval_rows or None)
    if args.chat_template:
        from minialign.data.chat import to_chat_format

        pairs = to_chat_format(pairs, tok)
    limits = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    pad, bs = tok.pad_token_id, args.batch_size
    if args.sft_run:
        from minialign.commands.recipes import dpo_start_model
        from minialign.config.schema import DPOConfig

        base = dpo_start_model(DPOConfig(sft=args.sft_run, tokenizer=args.tokenizer), tok)
    else:
        base = load_model(args.model, seed=args.seed)  # the evaluators move each model to the device themselves
    trained = adapters.load_adapter(base, args.adapter) if args.adapter else load_model(args.model_dir)
    def on_base(score):
        """``score`` of the starting model: the adapter switched off, or the base weights loaded alone."""
        if not args.adapter:
            return score(base)
        with lora.disabled(trained):
            return score(trained)

    if args.task == "dpo":
        items = tokenize_pairs(pairs, tok, **limits)
        score = lambda model: pair_logps(model, items, pad_id=pad, batch_size=bs, device=device)  # noqa: E731
        out = preference_metrics(score(trained), on_base(score), args.beta)
    else:
        items = tokenize_sft(pairs, tok, **limits)
        base_out = on_base(lambda model: heldout_loss(model, items, pad_id=pad, batch_size=bs, device=device))
        per = heldout_nll(trained, items, pad_id=pad, batch_size=bs, device=device)  # [N, 2]: NLL sum, tokens
        out = {**pooled_loss(per), "base_loss": base_out["loss"],
               "base_perplexity": base_out["perplexity"], "n_examples": len(items),
               # kept compact: a paired interval between two results scored on the same tokens (e2e_table)
               "per_example": [[round(nll, 4), int(n)] for nll, n in per.tolist()]}
    out["truncated"] = items.truncated
    out["scored_on"] = device
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = score(args)
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
