"""Decoding speed: minialign's static decoder against transformers' generate (dynamic cache; static cache + compile).

The three decoders run in one process, on the same model, prompts and settings, through ``minialign.modeling.generate``
(same tokenization, length-sorted batches, EOS and stop strings): ``decoder="static"`` (``minialign.modeling.decoder``, one
``StaticDecoder`` reused so its CUDA graphs are recorded during the warm-up), ``"static-plain"`` (the same without
``torch.compile``), ``"hf"`` (transformers' ``generate``, dynamic cache) and ``"hf-static"`` (transformers' static
cache, which its ``generate`` compiles on a GPU: ``torch.compile(mode="reduce-overhead")`` through ``CompileConfig``).
For each batch size: one untimed warm-up pass
over every prompt, then ``--repeats`` timed passes (device synced around each).

Measured per decoder and batch size: ``new_tokens`` (tokens of the answers, EOS included), ``tokens_per_s`` (those
over the best pass's wall time), ``ms_per_step`` (wall time over the decode steps the batches needed: each batch runs
as many steps as its longest answer), and for greedy decoding ``identical_to_hf``, the share of answers whose text
equals transformers' dynamic-cache answer at the same batch size. A decoder that fails records its error; the others
still run. Results are printed and written to ``--json-out`` with the command line.

    python benchmarks/bench_decode.py --json-out benchmarks/results/decode-h100.json            # GPU: SmolLM2, bf16
    python benchmarks/bench_decode.py --model tiny-llama --tokenizer demo --rows 0:2 --batch-sizes 2 \\
        --max-new-tokens 4 --json-out /tmp/decode.json                                         # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minialign.base.devices import device_name, sync
from minialign.data import load_preference_pairs
from minialign.modeling.decoder import StaticDecoder
from minialign.modeling.generate import generate
from minialign.modeling.models import load_model, load_tokenizer

# hf first: the others are compared with its answers. static-plain: the static decoder without torch.compile;
# static-flex: with FlexAttention's split-KV decoding kernel (minialign.modeling.flex_decode); static-triton: with
# minialign.ops.triton_decode, the cache stores and the attention in one kernel. (The memory-efficient kernel raced
# here once, 62.9k against FlashAttention's 75.7k new tokens/s on an H100, NOTES entry 30, and was removed.)
# static-triton-compiled-prefill: static-triton with its prefill passes compiled too (StaticDecoder's opt-in
# compile_prefill; warmup_s shows what the compilation costs a process). static-triton-early-looks: static-triton
# reading each look at its rows at once, so the GPU waits on the host's work, as every decoder did before NOTES 37.
# Each static variant's StaticDecoder arguments (FlashAttention, compiled, late looks unless it says otherwise).
STATIC = {"static": {}, "static-plain": {"compile": False}, "static-flex": {"attention": "flex"},
          "static-triton": {"attention": "triton"},
          "static-triton-compiled-prefill": {"attention": "triton", "compile_prefill": True},
          "static-triton-early-looks": {"attention": "triton", "late_looks": False}}
DECODERS = ("hf", *STATIC, "hf-static")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model to decode with (minialign names)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"),
                        help="preference file whose prompts are decoded")
    parser.add_argument("--rows", default="0:256", help="rows of --data (START:STOP)")
    parser.add_argument("--batch-sizes", default="64,256", help="comma-separated batch sizes")
    parser.add_argument("--decoders", default=",".join(DECODERS), help=f"subset of {','.join(DECODERS)}")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per answer at most")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on a CPU unless given")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per decoder and batch size")
    parser.add_argument("--sample", action="store_true", help="sample (temperature 1, top-p 0.95) instead of greedy")
    parser.add_argument("--json-out", required=True, help="where the JSON result goes (written atomically)")
    return parser.parse_args(argv)


def answer_tokens(completions) -> int:
    """Tokens of the answers as decoded: the kept tokens plus the EOS that ended an answer."""
    return sum(c.n_tokens + (c.stop == "eos") for c in completions)


def decode_steps(completions, batch_size: int, lengths: list[int]) -> int:
    """Decode steps the batches needed: each batch (length-sorted, as ``generate`` forms them) runs as long as its
    longest answer."""
    order = sorted(range(len(completions)), key=lambda i: -lengths[i])
    per_row = [completions[i].n_tokens + (completions[i].stop == "eos") for i in order]
    return sum(max(per_row[s : s + batch_size]) for s in range(0, len(per_row), batch_size))


def measure(model, tokenizer, prompts: list[str], decoder, batch_size: int, args, eos) -> tuple[dict, list]:
    """Warm-up pass, then ``args.repeats`` timed passes; the row of the table and the answers of the last pass."""
    device = next(model.parameters()).device
    options = {"max_new_tokens": args.max_new_tokens, "batch_size": batch_size, "details": True, "decoder": decoder,
                   "eos_token_id": eos, "do_sample": args.sample, "top_p": 0.95 if args.sample else 1.0}

    def timed() -> tuple[list, float]:
        sync(device)
        start = time.perf_counter()
        out = generate(model, tokenizer, prompts, **options)
        sync(device)
        return out, time.perf_counter() - start

    warmup = timed()[1]  # compilation, graph capture, allocator
    walls, answers = [], []
    for _ in range(args.repeats):
        answers, wall = timed()
        walls.append(wall)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    tokens, steps, best = answer_tokens(answers), decode_steps(answers, batch_size, lengths), min(walls)
    row = {"warmup_s": round(warmup, 3), "wall_s": [round(w, 4) for w in walls], "new_tokens": tokens,
           "decode_steps": steps,
           "tokens_per_s": round(tokens / best, 1), "ms_per_step": round(1000 * best / steps, 3),
           "finished_share": round(sum(c.finished for c in answers) / len(answers), 4)}
    if getattr(decoder, "fallback", None):  # the variant failed and the decoder fell back: not the variant's speed
        row["fallback"] = decoder.fallback
    return row, answers


def identical_share(answers, reference) -> float:
    """The share of ``answers`` whose text equals ``reference``'s answer to the same prompt."""
    return round(sum(a.text == r.text for a, r in zip(answers, reference)) / len(answers), 4)


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_model(args.model, dtype=dtype).to(device).eval()
    for attr in ("quantization_config",):  # a GGUF-loaded model's leftover (shared/README.md): blocks compiling
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer, model.is_quantized = None, False
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else model.config.eos_token_id  # the model's EOS (SmolLM2's GGUF tokenizer names another)
    prompts = [pair.prompt for pair in load_preference_pairs(args.data, rows=args.rows)]
    result = {
        "command": shlex.join(["python", "benchmarks/bench_decode.py", *argv]),
        "device": device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "model": args.model, "dtype": str(dtype).removeprefix("torch."),
        "prompts": len(prompts), "rows": args.rows, "data": args.data, "max_new_tokens": args.max_new_tokens,
        "decoding": "sampled (top-p 0.95)" if args.sample else "greedy", "repeats": args.repeats,
        "definitions": {"tokens_per_s": "answer tokens (EOS included) / best pass wall time, whole generate() call",
                        "ms_per_step": "best pass wall time / decode steps (each batch: its longest answer)",
                        "identical_to_hf": "share of answers whose text equals decoder='hf' at this batch size",
                        "identical_to_static": "static-flex and the static-triton rows: the same share against "
                                               "decoder='static'",
                        "identical_to_static_triton": "static-triton-early-looks: the same share against "
                                                      "static-triton (1.0 where no row ends early: the same work)",
                        "warmup_s": "the untimed first pass's wall: compilation and graph capture included"},
        "results": {},
    }
    decoders = [d for d in DECODERS if d in args.decoders.split(",")]
    statics: dict[str, StaticDecoder] = {}  # one per variant, reused: graphs recorded during the warm-ups
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        rows, reference, static_answers, triton_answers = {}, None, None, None
        for name in decoders:
            try:
                if name in STATIC and name not in statics:
                    statics[name] = StaticDecoder(model, **{"attention": "flash", **STATIC[name]})
                row, answers = measure(model, tokenizer, prompts, statics.get(name, name), batch_size, args, eos)
                if name == "hf":
                    reference = answers
                if name == "static":
                    static_answers = answers
                if "attention" in STATIC.get(name, {}) and static_answers is not None and not args.sample:
                    row["identical_to_static"] = identical_share(answers, static_answers)
                if name == "static-triton":
                    triton_answers = answers
                if name == "static-triton-early-looks" and triton_answers is not None:  # same kernels, other host order
                    row["identical_to_static_triton"] = identical_share(answers, triton_answers)
                if reference is not None and not args.sample:
                    row["identical_to_hf"] = identical_share(answers, reference)
                if name in STATIC and "tokens_per_s" in rows.get("hf", {}):
                    row["speedup_vs_hf"] = round(row["tokens_per_s"] / rows["hf"]["tokens_per_s"], 2)
                rows[name] = row
            except Exception as exc:  # noqa: BLE001 - one decoder's failure must not lose the others' numbers
                rows[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            shown = {k: v for k, v in rows[name].items() if k != "traceback"}
            print(f"batch {batch_size:>4} {name:>12}: {json.dumps(shown)}", flush=True)
        if "static" in rows and "tokens_per_s" in rows.get("hf-static", {}) and "tokens_per_s" in rows["static"]:
            rows["static"]["speedup_vs_hf_static"] = round(
                rows["static"]["tokens_per_s"] / rows["hf-static"]["tokens_per_s"], 2)
        result["results"][str(batch_size)] = rows
    return result


def write_json(result: dict, path: str) -> None:
    """Atomically: a temporary file in the same folder, then ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, target)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = run(args, argv)
    write_json(result, args.json_out)
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
