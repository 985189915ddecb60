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
import time
from pathlib import Path

import yaml

from minialign.base.devices import resolve_device
from minialign.base.errors import UserError
from minialign.base.files import read_json, write_json
from minialign.commands import folders, recipes
from minialign.commands import resume as resume_rules
from minialign.config.evaluation import RunConfig
from minialign.config.presets import CONFIG_FILE, build, check_keys, load_run_config, save_config
from minialign.config.schema import DPOConfig, SFTConfig, check_choices
from minialign.data import collate_sft, tokenize_pairs, tokenize_sft
from minialign.data.splits import load_pairs
from minialign.evaluation.evaluate import (
    dpo_eval,
    dpo_samples,
    heldout_loss,
    pair_logps,
    preference_metrics,
    sft_samples,
)
from minialign.modeling import adapters, lora
from minialign.modeling.models import default_tokenizer, load_model, load_tokenizer
from minialign.training.bench import Measurement, compare_modes
from minialign.training.train import flat_batch_size, plan_run_shapes, use_varlen

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


class Context:
    """What every stage needs, loaded once: config, folder, tokenizer and the held-out pairs."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.sft_cfg = train_config(cfg, SFTConfig, "sft", cfg.sft)
        self.dpo_cfg = train_config(cfg, DPOConfig, "dpo", cfg.dpo)
        self.device = resolve_device(cfg.device)
        try:
            self.tokenizer = load_tokenizer(cfg.tokenizer or default_tokenizer(cfg.model), cache=cfg.cache)
            self.train_pairs, self.eval_pairs = load_pairs(self.sft_cfg, self.tokenizer)
        except UserError as exc:
            raise UserError(f"{exc} {HINT}") from None
        self.eval_pairs = self.eval_pairs[: cfg.eval_pairs]
        self.pad = self.tokenizer.pad_token_id

    def tokenize(self, kind: str, pairs):
        limits = dict(max_length=self.sft_cfg.max_length, max_prompt_length=self.sft_cfg.max_prompt_length)
        if kind == "sft":
            return tokenize_sft(pairs, self.tokenizer, truncation=self.sft_cfg.truncation, **limits)
        return tokenize_pairs(pairs, self.tokenizer, **limits)


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
    started = (Path(cfg.out) / CONFIG_FILE).exists()
    if started:
        cfg = resume_rules.resume_config(Path(cfg.out), type(cfg))
    run(cfg, resume=started)
    return {}


def stage_eval(ctx: Context) -> dict:
    cfg = ctx.cfg
    sft_cfg = load_run_config(ctx.run_dir / "sft", SFTConfig)
    dpo_cfg = load_run_config(ctx.run_dir / "dpo", DPOConfig)
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
        policy, reference = adapters.load_adapter(sft_model, final / "adapter"), None
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
    from minialign.commands.evalsides import config_training, folder_tokenizer, judged_compare
    from minialign.evaluation.evalrows import heldout_rows, load_prompts
    from minialign.evaluation.geneval import Decoding
    from minialign.reporting.generation import tables_text

    cfg = ctx.cfg
    if cfg.eval_prompts < 1:
        return None
    chat = ctx.tokenizer if dpo_cfg.chat_template else None
    rows = heldout_rows(dpo_cfg)
    prompts = load_prompts(rows, cfg.eval_prompts, chat_tokenizer=chat, flag="--eval-prompts")
    decoding = Decoding(cfg.max_new_tokens, cfg.eval_samples, cfg.eval_temperature, cfg.eval_top_p, cfg.seed)
    if cfg.eval_suite:
        return suite_eval(ctx, dpo_cfg, policy, reference, decoding)
    results = judged_compare(policy, reference, ctx.tokenizer, prompts, rows, config_training(dpo_cfg, "dpo"),
                             decoding, ctx.device, judge_path=cfg.judge)
    results.update(chat_template=chat is not None, tokenizer=folder_tokenizer(ctx.run_dir / "dpo", dpo_cfg))
    print("  generation metrics (reference vs DPO policy):\n" + tables_text(results))
    return results


def suite_eval(ctx: Context, dpo_cfg: DPOConfig, policy, reference, decoding) -> dict:
    """The generation metrics on every axis of ``eval_suite`` (axes without ``n``: ``eval_prompts`` prompts or as
    many as there are), each scored by its own judge."""
    from minialign.commands.evalsides import config_training, folder_tokenizer
    from minialign.commands.evalsuite import axis_prompts, judged_axes, load_suite, suite_record
    from minialign.reporting.suite import suite_text

    cfg = ctx.cfg
    axes = load_suite(cfg.eval_suite, "eval_suite")
    trained = config_training(dpo_cfg, "dpo")
    chat = ctx.tokenizer if dpo_cfg.chat_template else None
    plans = axis_prompts(axes, cfg.eval_suite, cfg.eval_prompts, chat, trained, flag="eval_suite")
    common = {"policy": f"dpo run {ctx.run_dir / 'dpo'}", "reference": "the policy's starting model",
              "chat_template": chat is not None, "tokenizer": folder_tokenizer(ctx.run_dir / "dpo", dpo_cfg)}
    results = judged_axes(policy, reference, ctx.tokenizer, plans, trained, decoding, ctx.device, common=common)
    results = {**common, "suite": suite_record(cfg.eval_suite, axes),
               "policy_trained": [{"what": what, **r.to_dict()} for what, r in trained], **results}
    print("  generation metrics (reference vs DPO policy), every axis:\n" + suite_text(results))
    return results


def check_suite(ctx: Context) -> None:
    """Before anything runs: ``eval_suite`` parses, its judges read the run's vocabulary, and no axis's prompts are
    rows the SFT or DPO stage will train on."""
    from minialign.commands.evalsuite import axis_prompts, check_judges, load_suite
    from minialign.evaluation.evalrows import train_rows

    cfg = ctx.cfg
    if cfg.judge:
        raise UserError("Invalid configuration: eval_suite names each axis's judge; drop judge (--judge) or "
                        "eval_suite (--eval-suite).")
    axes = load_suite(cfg.eval_suite, "eval_suite")
    check_judges(axes, cfg.eval_suite, ctx.tokenizer, cfg.tokenizer or default_tokenizer(cfg.model),
                 "eval_suite")
    trained = [("the run's SFT stage", train_rows(ctx.sft_cfg)), ("the run's DPO stage", train_rows(ctx.dpo_cfg))]
    axis_prompts(axes, cfg.eval_suite, cfg.eval_prompts, None, trained, flag="eval_suite")


def stage_report(ctx: Context) -> dict:
    from minialign.reporting.report import write_report

    for name, path in write_report(ctx.run_dir).items():
        print(f"  {name}: {path}")
    return {}


def _check_out(cfg: RunConfig, overwrite: bool) -> None:
    """Refuse, before anything is loaded, an --out holding another command's results, runs its stages would adopt,
    or another experiment (unless ``overwrite``)."""
    run_dir = Path(cfg.out)
    folders.check_folder(run_dir, "run", overwrite=overwrite)
    if (run_dir / RUN_FILE).exists() and not overwrite:
        raise UserError(f"{run_dir} already holds a run. Continue it with `minialign run --resume {run_dir}`, "
                        "start over with --overwrite, or choose another --out.")


def _prepare(cfg: RunConfig, overwrite: bool) -> None:
    run_dir = Path(cfg.out)
    _check_out(cfg, overwrite)
    if overwrite and run_dir.exists():
        folders.clear_folder(run_dir, folders.overwrite_kinds(run_dir, "run"))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / RUN_FILE)


def resume_config(run_dir: Path, requested: dict | None = None) -> RunConfig:
    """The run's own run.yaml (``out``: the folder), with ``requested`` changes over it: only ``stages`` may change
    (``resume.RUN_SAFE``); any other difference is refused, field by field."""
    path = Path(run_dir) / RUN_FILE
    folders.check_folder(run_dir, "run", resume=True)
    if not path.is_file():
        raise UserError(f"{run_dir} is not a minialign run folder (no {RUN_FILE}); start one with `minialign run`.")
    saved = build(RunConfig, yaml.safe_load(path.read_text()) or {})
    saved.out = str(run_dir)
    cfg = build(RunConfig, dataclasses.asdict(saved), requested) if requested else saved
    resume_rules.refuse_unsafe(Path(run_dir), "run", resume_rules.changes(saved, cfg), resume_rules.RUN_SAFE)
    return cfg


def _record_changes(cfg: RunConfig) -> None:
    """A resume's accepted changes (``stages``) go into run.yaml, and are said."""
    run_dir = Path(cfg.out)
    saved = resume_config(run_dir)
    changed = resume_rules.changes(saved, cfg)
    if changed:
        print(f"minialign run: resuming {run_dir} with {resume_rules.listed(changed)}.")
        save_config(cfg, run_dir / RUN_FILE)


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    check_choices(cfg)  # stages, device: a YAML preset or a resumed run.yaml does not pass through argparse
    if not resume:
        _check_out(cfg, overwrite)
    ctx = Context(cfg)  # tokenizer and data first: a bad source fails before the run folder is written
    stages_file, results_file = ctx.run_dir / "stages.json", ctx.run_dir / "results.json"
    eval_pending = "eval" in cfg.stages and not (resume and "eval" in read_json(stages_file).get("done", []))
    if cfg.eval_suite and eval_pending:
        check_suite(ctx)
    elif cfg.judge and eval_pending:
        from minialign.commands.evalsides import check_judge

        check_judge(cfg.judge, "--judge", ctx.tokenizer, cfg.tokenizer or default_tokenizer(cfg.model))
    if resume:
        _record_changes(cfg)
    else:
        _prepare(cfg, overwrite)
    done = read_json(stages_file).get("done", [])
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
        results = read_json(results_file)
        results.update(produced)
        results["config"] = dataclasses.asdict(cfg)
        results.setdefault("timings", {})[stage] = round(time.perf_counter() - t0, 2)
        write_json(results_file, results)
        done.append(stage)
        write_json(stages_file, {"done": done})
    seconds = sum(read_json(results_file)["timings"].values())
    print(f"minialign run: done in {seconds:.0f} s; report in {ctx.run_dir / 'report.html'}")
    return ctx.run_dir
