"""The Unsloth side of the end-to-end race: the script an Unsloth user writes for one run, plus measurement.

``bench_e2e.py`` starts it (runners ``unsloth`` and ``unsloth-ours``) in a fresh Python process, exactly as it
starts ``trl_e2e.py``, and counts from spawn to the ``t_done`` written right after the final held-out
``trainer.evaluate``: Python start, ``import unsloth`` (which patches transformers, PEFT and TRL, and is most of
its start-up), loading, TRL's tokenization of the text, every step and that evaluation.

Unsloth's documented path, nothing of minialign's in the model or the step: ``FastLanguageModel.from_pretrained``
(16-bit weights: ``load_in_4bit=False``; ``full_finetuning=True`` for full runs), ``FastLanguageModel.get_peft_model``
(LoRA r/alpha on q, k, v, o, gate, up and down, dropout 0, no bias: all block linears, as minialign's), then TRL's
``DPOTrainer`` / ``SFTTrainer``, which ``import unsloth`` has replaced with its own patched versions. The trainer
configuration, data, timing and JSON are ``trl_e2e.run_script``'s, so both peers are measured the same way.

Settings: ``--grad-checkpointing unsloth --optim adamw_8bit`` (runner ``unsloth``) is what Unsloth's own notebooks
use and its low-memory mode; ``--grad-checkpointing off --optim adamw_torch_fused`` (runner ``unsloth-ours``) is
minialign's setting (no recomputation, fused AdamW). Needs unsloth + unsloth-zoo, trl <= 1.15, datasets < 5 and
bitsandbytes (``benchmarks/unsloth_wheels.py`` fetches them); a missing one exits 3 naming it, and writes
``{"error": ...}`` to ``--out-json`` so the benchmark's JSON says which package or call failed.
"""

from __future__ import annotations

import time

T_START = time.time()  # before the heavy imports: `import unsloth` is part of what its users wait for

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MISSING_EXIT = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trl_e2e import parse_args as trl_args

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--grad-checkpointing", choices=["unsloth", "on", "off"], default="unsloth",
                       help="Unsloth's use_gradient_checkpointing: 'unsloth' (its default, offloaded), on, off")
    extra.add_argument("--optim", default="adamw_8bit", help="transformers optim name (Unsloth's notebooks: adamw_8bit)")
    extra.add_argument("--runner", default="unsloth", help="the name written into the JSON")
    own, rest = extra.parse_known_args(argv)
    args = trl_args(rest)
    args.grad_checkpointing, args.optim, args.runner = own.grad_checkpointing, own.optim, own.runner
    return args


def fail(args: argparse.Namespace, stage: str, exc: BaseException) -> int:
    """Say which package or call failed, on stderr and in the JSON the benchmark reads; nothing is skipped silently."""
    what = f"{stage}: {type(exc).__name__}: {exc}"
    print(f"unsloth_peer: {what}", file=sys.stderr, flush=True)
    traceback.print_exc()
    from minialign.base.files import write_json

    write_json(Path(args.out_json), {"runner": args.runner, "error": what, "stage": stage}, indent=1)
    return MISSING_EXIT


def load_with_unsloth(args: argparse.Namespace) -> tuple:
    """Unsloth's documented loading: its model class, its LoRA, its tokenizer (from the model folder)."""
    from importlib.metadata import version

    from unsloth import FastLanguageModel

    checkpointing = {"unsloth": "unsloth", "on": True, "off": False}[args.grad_checkpointing]
    model, tok = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=args.max_length, dtype=None, load_in_4bit=False,
        full_finetuning=args.mode == "full", use_gradient_checkpointing=checkpointing, random_state=args.seed)
    if args.mode == "lora":
        alpha = int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha
        model = FastLanguageModel.get_peft_model(
            model, r=args.lora_r, target_modules=LINEARS, lora_alpha=alpha, lora_dropout=0.0, bias="none",
            use_gradient_checkpointing=checkpointing, random_state=args.seed)
    versions = {n: version(n) for n in ("unsloth", "unsloth_zoo", "transformers", "trl", "peft", "bitsandbytes")}
    return tok, model, None, {"optim": args.optim}, versions


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network here: skip its usage ping
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    try:
        import unsloth  # noqa: F401 - first, as its docs say: it patches transformers, PEFT and TRL on import
    except Exception as exc:  # noqa: BLE001 - ImportError and whatever its own checks raise
        return fail(args, "import unsloth", exc)
    from trl_e2e import run_script

    try:
        # transformers' is_gradient_checkpointing does not see Unsloth's own checkpointing: record the setting
        return run_script(args, args.runner, load_with_unsloth, T_START,
                          {"unsloth_gradient_checkpointing": args.grad_checkpointing})
    except Exception as exc:  # noqa: BLE001 - recorded for the benchmark's JSON, then the next runner goes on
        fail(args, "run", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
