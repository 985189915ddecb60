"""`minialign run`: the reference experiment in one command, as five resumable stages.

    lora    rank table + LoRA-vs-full speed and memory on the same batches
    sft     LoRA SFT on the chosen responses            -> RUN_DIR/sft/
    dpo     LoRA DPO from the SFT model (its reference) -> RUN_DIR/dpo/
    eval    held-out loss, preference accuracies, side-by-side samples
    report  RUN_DIR/report.md, report.html, plots

Each finished stage adds its numbers to RUN_DIR/results.json (written atomically) and is recorded in
RUN_DIR/stages.json; a failure leaves the earlier stages intact and `--resume RUN_DIR` starts at the
first unfinished one (an interrupted SFT or DPO continues from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import yaml

from minialign import lora
from minialign.bench import measure_fresh
from minialign.config import DPOConfig, RunConfig, SFTConfig, build, check_keys, save_config
from minialign.data import collate_sft, tokenize_pairs, tokenize_sft
from minialign.errors import UserError
from minialign.evaluate import dpo_eval, dpo_samples, heldout_loss, preference_metrics, pair_logps, sft_samples
from minialign.models import load_model, load_tokenizer
from minialign import recipes

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
            self.tokenizer = load_tokenizer(cfg.tokenizer or recipes.default_tokenizer(cfg.model))
            self.train_pairs, self.eval_pairs = recipes.load_pairs(self.sft_cfg, self.tokenizer)
        except UserError as exc:
            raise UserError(f"{exc} {HINT}") from None
        self.eval_pairs = self.eval_pairs[: cfg.eval_pairs]
        self.pad = self.tokenizer.pad_token_id

    def tokenize(self, kind: str, pairs):
        fn = tokenize_sft if kind == "sft" else tokenize_pairs
        return fn(pairs, self.tokenizer, max_length=self.sft_cfg.max_length, max_prompt_length=self.sft_cfg.max_prompt_length)


def stage_lora(ctx: Context) -> dict:
    cfg = ctx.cfg
    ranks = lora.lora_param_table(load_model(cfg.model, seed=cfg.seed), cfg.ranks)
    examples = ctx.tokenize("sft", ctx.train_pairs[: cfg.bench_batch_size * 4])
    batches = [collate_sft(examples[i : i + cfg.bench_batch_size], pad_id=ctx.pad) for i in range(0, len(examples), cfg.bench_batch_size)]
    bench = []
    for mode in ("lora", "full"):
        m = measure_fresh(cfg.model, cfg.seed, batches, task="sft", full=mode == "full", lora_r=8,
                          steps=cfg.bench_steps, warmup=3, device=ctx.device)
        bench.append(dataclasses.asdict(m))
        print(f"  {mode:>4}: {m.tokens_per_s:,.0f} tokens/s, peak {m.peak_memory_mb:,.1f} MB ({m.memory_kind}, {m.device})")
    return {"lora": {"model": cfg.model, "ranks": ranks, "benchmark": bench}}


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
    before = heldout_loss(load_model(sft_cfg.model, seed=sft_cfg.seed), examples, **kw)
    sft_model = recipes.dpo_start_model(dpo_cfg, ctx.tokenizer)
    after = heldout_loss(sft_model, examples, **kw)
    sft = {
        "eval_loss_before": before["loss"], "eval_loss_after": after["loss"],
        "eval_ppl_before": before["perplexity"], "eval_ppl_after": after["perplexity"],
        "samples": sft_samples(sft_model, ctx.tokenizer, shown, max_new_tokens=cfg.max_new_tokens, device=ctx.device),
    }
    final = ctx.run_dir / "dpo" / "final"
    if (final / "adapter").is_dir():
        policy = lora.load_adapter(sft_model, final / "adapter")
        metrics = dpo_eval(policy, pairs, beta=dpo_cfg.beta, **kw)
        samples = dpo_samples(policy, ctx.tokenizer, shown, max_new_tokens=cfg.max_new_tokens, device=ctx.device)
    else:  # full fine-tuning: a separate policy model, the SFT model as reference
        policy = load_model(str(final / "model"))
        metrics = preference_metrics(pair_logps(policy, pairs, **kw), pair_logps(sft_model, pairs, **kw), dpo_cfg.beta)
        ref_out = sft_samples(sft_model, ctx.tokenizer, shown, max_new_tokens=cfg.max_new_tokens, device=ctx.device)
        pol_out = sft_samples(policy, ctx.tokenizer, shown, max_new_tokens=cfg.max_new_tokens, device=ctx.device)
        samples = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "reference": r["model"], "policy": o["model"]}
                   for p, r, o in zip(shown, ref_out, pol_out)]
    print(f"  SFT held-out loss {before['loss']:.3f} -> {after['loss']:.3f}; preference accuracy "
          f"reference {metrics['reference_accuracy']:.3f} -> policy {metrics['policy_accuracy']:.3f}; "
          f"reward accuracy {metrics['reward_accuracy']:.3f}, margin {metrics['reward_margin']:.3f}")
    adapter = (final / "adapter").is_dir()
    generation = generation_eval(ctx, dpo_cfg, policy, None if adapter else sft_model)
    return {"sft": sft, "dpo": {"eval": metrics, "samples": samples}, "generation": generation}


def generation_eval(ctx: Context, dpo_cfg: DPOConfig, policy, reference) -> dict | None:
    """The generation metrics of `minialign eval` (same code path) for the DPO policy and its reference
    (None: the policy with its adapters off), over the first ``eval_prompts`` held-out prompts of the DPO run;
    with ``judge`` (RunConfig.judge), also the judge's scores and the policy's win rate, beside the judge's held-out accuracy."""
    from minialign.evalcmd import config_training, load_checked_judge
    from minialign.evalrows import heldout_rows, load_prompts
    from minialign.geneval import Decoding, compare, metrics_table, text_table, win_table

    cfg = ctx.cfg
    if cfg.eval_prompts < 1:
        return None
    chat = ctx.tokenizer if dpo_cfg.chat_template else None
    rows = heldout_rows(dpo_cfg)
    prompts = load_prompts(rows, cfg.eval_prompts, chat_tokenizer=chat, strict=False)
    judge, context = None, None
    if cfg.judge:
        judge, context = load_checked_judge(cfg.judge, ctx.device, prompts, rows, config_training(dpo_cfg, "dpo"))
    policy.to(ctx.device)
    if reference is not None:
        reference.to(ctx.device)
    decoding = Decoding(cfg.max_new_tokens, cfg.eval_samples, cfg.eval_temperature, cfg.eval_top_p, cfg.seed)
    results = compare(policy, reference, ctx.tokenizer, prompts, decoding, judge=judge, judge_context=context)
    print("  generation metrics (reference vs DPO policy):\n" + text_table(metrics_table(results)))
    wins = win_table(results)
    if wins is not None:
        print(text_table(wins))
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
    unknown = sorted(set(cfg.stages) - set(STAGES))
    if unknown:
        raise UserError(f"Unknown stage(s) {', '.join(unknown)}; --stages takes any of {' '.join(STAGES)}.")
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
