"""`minialign run`: the reference experiment in one command, as five resumable stages.

    lora    rank table + LoRA-vs-full speed and memory on the same batches (bench.compare_modes)
    sft     LoRA SFT on the chosen responses            -> RUN_DIR/sft/
    dpo     LoRA DPO from the SFT model (its reference) -> RUN_DIR/dpo/
    eval    held-out loss, preference accuracies, side-by-side samples
    report  RUN_DIR/report.md, report.html, plots

Each finished stage adds its numbers to RUN_DIR/results.json (written atomically) and is recorded in
RUN_DIR/stages.json; a failure leaves the earlier stages intact and `--resume RUN_DIR` starts at the
first unfinished one (an interrupted SFT or DPO continues from its last checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import yaml

from minialign import lora
from minialign.bench import Measurement, compare_modes
from minialign.config import DPOConfig, RunConfig, SFTConfig, check_choices
from minialign.data import collate_sft, tokenize_pairs, tokenize_sft
from minialign.errors import UserError
from minialign.evaluate import dpo_eval, dpo_samples, heldout_loss, preference_metrics, pair_logps, sft_samples
from minialign.models import load_model, load_tokenizer
from minialign.presets import build, check_keys, save_config
from minialign import recipes
from minialign.train import flat_batch_size, plan_run_shapes, use_varlen

STAGES = ("lora", "sft", "dpo", "eval", "report")
RUN_FILE = "run.yaml"
HINT = (
    "To run offline, use `minialign run --demo`, or point the run at local files, e.g. "
    "`minialign run --model pythia-70m --tokenizer ../shared/tokenizers/gpt-neox-20b/tokenizer.json "
    "--train-data ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz --train-rows 300: "
    "--eval-data ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz --eval-rows 0:300`."
)


def train_config(cfg: RunConfig, cls, stage: str, overrides: dict):
    """The SFT or DPO config of this run: the run's model/data, then the preset's per-stage overrides."""
    check_keys(overrides, cls, f"run config '{stage}' section")
    base = dict(
        model=cfg.model, tokenizer=cfg.tokenizer, seed=cfg.seed, device=cfg.device, chat_template=cfg.chat_template,
        dataset=cfg.train_data or cfg.dataset, data_dir=cfg.data_dir, train_rows=cfg.train_rows,
        eval_data=cfg.eval_data, eval_rows=cfg.eval_rows, eval_limit=cfg.eval_pairs, out=str(Path(cfg.out) / stage),
        cache=cfg.cache,
    )
    if cfg.train_data and not cfg.eval_data and not cfg.eval_rows:
        base["eval_data"] = ""  # one local source: recipes split it 90/10
    return build(cls, base, overrides)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class Context:
    """What every stage needs, loaded once: config, folder, tokenizer and the held-out pairs."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.sft_cfg = train_config(cfg, SFTConfig, "sft", cfg.sft)
        self.dpo_cfg = train_config(cfg, DPOConfig, "dpo", cfg.dpo)
        self.device = recipes.resolve_device(cfg.device)
        try:
            self.tokenizer = load_tokenizer(cfg.tokenizer or recipes.default_tokenizer(cfg.model), cache=cfg.cache)
            self.train_pairs, self.eval_pairs = recipes.load_pairs(self.sft_cfg, self.tokenizer)
        except UserError as exc:
            raise UserError(f"{exc} {HINT}") from None
        self.eval_pairs = self.eval_pairs[: cfg.eval_pairs]
        self.pad = self.tokenizer.pad_token_id

    def tokenize(self, kind: str, pairs):
        fn = tokenize_sft if kind == "sft" else tokenize_pairs
        return fn(pairs, self.tokenizer, max_length=self.sft_cfg.max_length, max_prompt_length=self.sft_cfg.max_prompt_length)


def stage_lora(ctx: Context) -> dict:
    """LoRA's parameter counts per rank, and LoRA vs full fine-tuning timed fairly (``bench.compare_modes``): both
    on the batches and fast path SFT trains with on this device, in one warmed process, taking turns."""
    cfg = ctx.cfg
    if cfg.bench_repeats < 1:
        raise UserError(f"Invalid configuration: bench_repeats must be >= 1 (got {cfg.bench_repeats}).")
    base = load_model(cfg.model, seed=cfg.seed, cache=cfg.cache)
    ranks = lora.lora_param_table(base, cfg.ranks)
    train = copy.deepcopy(ctx.sft_cfg)
    train.apply_fast(ctx.device.type, 1)  # what `minialign sft` would run on this device (one process)
    examples = ctx.tokenize("sft", ctx.train_pairs[: cfg.bench_batch_size * 4])
    batches, settings, path = _bench_batches(train, examples, cfg.bench_batch_size, ctx.pad, ctx.device)
    warmup = 3
    order = " ".join("L" if m == "lora" else "F" for _ in range(cfg.bench_repeats) for m in ("lora", "full"))
    method = (f"{path}. Both modes run in one process on the same {len(batches)} batches of {cfg.bench_batch_size}: "
              f"a warm-up run of each mode first (not counted), then {order}; every run starts from a fresh copy of "
              f"the model and times {cfg.bench_steps} steps after {warmup} warm-up steps. tokens/s and peak memory are "
              f"the median of the {cfg.bench_repeats} timed runs of each mode, with their spread (min-max).")
    if ctx.device.type == "cuda":
        method += " Peak memory is each run's own: the allocator's peak less what the process still held when it began."
    else:
        method += " On a CPU, peak memory is the process's peak resident set during a run, which includes what the " \
                  "process already holds."
    print(f"  method: {method}")

    def show(mode: str, timed: bool, m: Measurement) -> None:
        print(f"  {'run' if timed else 'warm-up'} {mode:>4}: {m.tokens_per_s:,.0f} tokens/s, "
              f"peak {m.peak_memory_mb:,.1f} MB")

    result = compare_modes(lambda: copy.deepcopy(base), batches, repeats=cfg.bench_repeats, on_run=show, task="sft",
                           lora_r=8, steps=cfg.bench_steps, warmup=warmup, device=ctx.device, **settings)
    for m in result["modes"]:
        print(f"  {m['mode']:>4}: {m['tokens_per_s']:,.0f} tokens/s (median of {m['repeats']}; "
              f"{m['tokens_per_s_min']:,.0f}-{m['tokens_per_s_max']:,.0f}), peak {m['peak_memory_mb']:,.1f} MB "
              f"({m['peak_memory_mb_min']:,.1f}-{m['peak_memory_mb_max']:,.1f}; {m['memory_kind']}, {m['device']})")
    return {"lora": {"model": cfg.model, "ranks": ranks, "benchmark": result["modes"], "benchmark_runs": result["runs"],
                     "benchmark_method": method}}


def _bench_batches(cfg: SFTConfig, examples, batch_size: int, pad: int, device) -> tuple[list[dict], dict, str]:
    """The benchmark's batches and ``bench.measure`` settings as `minialign sft` would lay out and run them with
    ``cfg`` (its fast setting applied), and that path in words."""
    batches = [collate_sft(examples[i : i + batch_size], pad_id=pad, pad_to_multiple_of=cfg.pad_to_multiple_of or None,
                           flat=cfg.padding_free) for i in range(0, len(examples), batch_size)]
    shapes = None
    if cfg.padding_free and cfg.shape_buckets > 0:  # as train.train plans them
        shapes = plan_run_shapes(cfg, [flat_batch_size(b) for b in batches])
    varlen = use_varlen(cfg, device)
    compiled = (cfg.compile_mode if cfg.padding_free else True) if cfg.compile else False
    settings = dict(shapes=shapes, varlen=varlen, attention=cfg.attention, cuda_graphs=cfg.cuda_graphs,
                    compile=compiled, compile_scope=cfg.compile_scope, grad_checkpointing=cfg.grad_checkpointing,
                    chunk_size=cfg.loss_chunk_size or None, target_multiple=cfg.pad_targets_to_multiple_of)
    parts = ["padding-free batches" if cfg.padding_free else "padded batches"]
    if shapes is not None:
        parts.append(f"shapes planned up front ({shapes.n_shapes})")
    if varlen and cfg.padding_free:
        parts.append("varlen attention")
    parts.append(f"torch.compile ({cfg.compile_scope})" if compiled else "eager")
    if cfg.cuda_graphs and device.type == "cuda":
        parts.append("whole-step CUDA graphs")
    path = f"Measured on the path `minialign sft --fast {cfg.fast}` trains on {device.type}: {', '.join(parts)}"
    return batches, settings, path


def stage_train(ctx: Context, kind: str) -> dict:
    cfg = ctx.sft_cfg if kind == "sft" else ctx.dpo_cfg
    if kind == "dpo":
        cfg.sft = str(ctx.run_dir / "sft")
    run = recipes.sft if kind == "sft" else recipes.dpo
    started = (Path(cfg.out) / recipes.CONFIG_FILE).exists()
    if started:
        cfg = recipes.resume_config(Path(cfg.out), type(cfg))
    run(cfg, resume=started)
    return {}


def stage_eval(ctx: Context) -> dict:
    cfg = ctx.cfg
    sft_cfg = recipes.load_run_config(ctx.run_dir / "sft", SFTConfig)
    dpo_cfg = recipes.load_run_config(ctx.run_dir / "dpo", DPOConfig)
    examples = ctx.tokenize("sft", ctx.eval_pairs)
    pairs = ctx.tokenize("dpo", ctx.eval_pairs)
    shown = ctx.eval_pairs[: cfg.samples]
    kw = dict(pad_id=ctx.pad, device=ctx.device)
    before = heldout_loss(load_model(sft_cfg.model, seed=sft_cfg.seed, cache=cfg.cache), examples, **kw)
    sft_model = recipes.dpo_start_model(dpo_cfg, ctx.tokenizer)
    after = heldout_loss(sft_model, examples, **kw)
    sft = {
        "eval_loss_before": before["loss"], "eval_loss_after": after["loss"],
        "eval_ppl_before": before["perplexity"], "eval_ppl_after": after["perplexity"],
        "samples": sft_samples(sft_model, ctx.tokenizer, shown, max_new_tokens=cfg.max_new_tokens, device=ctx.device),
    }
    final = ctx.run_dir / "dpo" / "final"
    if (final / "adapter").is_dir():  # the reference is the policy with its adapters off (None)
        policy, reference = lora.load_adapter(sft_model, final / "adapter"), None
        metrics = dpo_eval(policy, pairs, beta=dpo_cfg.beta, **kw)
    else:  # full fine-tuning: a separate policy model, the SFT model as reference
        policy, reference = load_model(str(final / "model")), sft_model
        metrics = preference_metrics(pair_logps(policy, pairs, **kw), pair_logps(sft_model, pairs, **kw), dpo_cfg.beta)
    samples = dpo_samples(policy, ctx.tokenizer, shown, max_new_tokens=cfg.max_new_tokens, device=ctx.device,
                          reference=reference)
    print(f"  SFT held-out loss {before['loss']:.3f} -> {after['loss']:.3f}; preference accuracy "
          f"reference {metrics['reference_accuracy']:.3f} -> policy {metrics['policy_accuracy']:.3f}; "
          f"reward accuracy {metrics['reward_accuracy']:.3f}, margin {metrics['reward_margin']:.3f}")
    generation = generation_eval(ctx, dpo_cfg, policy, reference)
    return {"sft": sft, "dpo": {"eval": metrics, "samples": samples}, "generation": generation}


def generation_eval(ctx: Context, dpo_cfg: DPOConfig, policy, reference) -> dict | None:
    """The generation metrics of `minialign eval` (same code path) for the DPO policy and its reference
    (None: the policy with its adapters off), over the first ``eval_prompts`` held-out prompts of the DPO run;
    with ``judge`` (RunConfig.judge), also the judge's scores and the policy's win rate, beside the judge's held-out accuracy."""
    from minialign.evalcmd import config_training, folder_tokenizer, judged_compare
    from minialign.evalrows import heldout_rows, load_prompts
    from minialign.geneval import Decoding, tables_text

    cfg = ctx.cfg
    if cfg.eval_prompts < 1:
        return None
    chat = ctx.tokenizer if dpo_cfg.chat_template else None
    rows = heldout_rows(dpo_cfg)
    prompts = load_prompts(rows, cfg.eval_prompts, chat_tokenizer=chat, flag="--eval-prompts")
    decoding = Decoding(cfg.max_new_tokens, cfg.eval_samples, cfg.eval_temperature, cfg.eval_top_p, cfg.seed)
    results = judged_compare(policy, reference, ctx.tokenizer, prompts, rows, config_training(dpo_cfg, "dpo"),
                             decoding, ctx.device, judge_path=cfg.judge)
    results.update(chat_template=chat is not None, tokenizer=folder_tokenizer(ctx.run_dir / "dpo", dpo_cfg))
    print("  generation metrics (reference vs DPO policy):\n" + tables_text(results))
    return results


def stage_report(ctx: Context) -> dict:
    from minialign.report import write_report

    for name, path in write_report(ctx.run_dir).items():
        print(f"  {name}: {path}")
    return {}


def _prepare(cfg: RunConfig, overwrite: bool) -> None:
    run_dir = Path(cfg.out)
    if (run_dir / RUN_FILE).exists() and not overwrite:
        raise UserError(f"{run_dir} already holds a run. Continue it with `minialign run --resume {run_dir}`, "
                        "start over with --overwrite, or choose another --out.")
    if overwrite and run_dir.exists():
        import shutil

        for name in ("sft", "dpo", "plots"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("results.json", "stages.json", "report.md", "report.html", RUN_FILE):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / RUN_FILE)


def resume_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a minialign run folder (no {RUN_FILE}); start one with `minialign run`.")
    cfg = build(RunConfig, yaml.safe_load(path.read_text()) or {})
    cfg.out = str(run_dir)
    return cfg


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    check_choices(cfg)  # stages, device: a YAML preset or a resumed run.yaml does not pass through argparse
    ctx = Context(cfg)  # tokenizer and data first: a bad source fails before the run folder is written
    stages_file, results_file = ctx.run_dir / "stages.json", ctx.run_dir / "results.json"
    if cfg.judge and "eval" in cfg.stages and not (resume and "eval" in _read_json(stages_file).get("done", [])):
        from minialign.evalcmd import check_judge

        check_judge(cfg.judge, "--judge", ctx.tokenizer, cfg.tokenizer or recipes.default_tokenizer(cfg.model))
    if not resume:
        _prepare(cfg, overwrite)
    done = _read_json(stages_file).get("done", [])
    steps = {"lora": stage_lora, "sft": lambda c: stage_train(c, "sft"), "dpo": lambda c: stage_train(c, "dpo"),
             "eval": stage_eval, "report": stage_report}
    for i, stage in enumerate(STAGES, 1):
        if stage in done:
            print(f"[{i}/{len(STAGES)}] {stage}: done earlier, skipped")
            continue
        if stage not in cfg.stages:
            print(f"[{i}/{len(STAGES)}] {stage}: not in --stages, skipped")
            continue
        print(f"[{i}/{len(STAGES)}] {stage} ...", flush=True)
        t0 = time.perf_counter()
        produced = steps[stage](ctx)
        results = _read_json(results_file)
        results.update(produced)
        results["config"] = dataclasses.asdict(cfg)
        results.setdefault("timings", {})[stage] = round(time.perf_counter() - t0, 2)
        _write_json(results_file, results)
        done.append(stage)
        _write_json(stages_file, {"done": done})
    print(f"minialign run: done in {sum(_read_json(results_file)['timings'].values()):.0f} s; report in {ctx.run_dir / 'report.html'}")
    return ctx.run_dir
