"""`minialign online`: on-policy iterative DPO (the RLHF-Workflow recipe; TRL's OnlineDPOTrainer in rounds).

Each round: sample ``--samples`` answers per prompt from the current policy (``generate.generate``), score them with
the reward models (``load_judge(...).score``), combine the scores and pair each prompt's best answer with
its worst (``online_pairs``), and train DPO on those pairs with the one shared loop (``train.train``). The model,
the reward models and the reference are loaded once; the policy keeps training across rounds (warm start), each
round with a fresh optimizer and learning-rate schedule, against a reference FIXED to the starting model (LoRA: the
adapters switched off; full fine-tuning: a frozen copy made before the first round).

A round writes ``round-K/`` (pairs.jsonl, its DPO metrics), then its weights (``checkpoints/round-000K``), then
``round-K/round.json`` last: the completion marker. ``--resume`` continues after the last complete round; a round
killed at any point (even SIGKILL) has no round.json and is redone from its start. Every round's randomness (prompt
choice, sampling, data order, dropout) is a function of (--seed, round), so a resumed run gives the uninterrupted
run's pairs and weights. ``rounds.jsonl``, ``metrics.jsonl`` (rows tagged with ``round``), ``summary.json`` and the
report are rebuilt from the complete rounds after each round (``online_report``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minialign.base import dist
from minialign.base.devices import resolve_device
from minialign.base.errors import UserError
from minialign.base.files import write_atomic
from minialign.commands import folders, recipes
from minialign.commands import resume as resume_rules
from minialign.commands.online_inputs import Prompt, check_reward_models, load_prompts
from minialign.commands.online_pairs import answer_stats, combine_scores, form_pairs, in_scope, penalise, round_prompts
from minialign.commands.online_report import ROUND_DONE, completed_rounds, rebuild_outputs, round_dir
from minialign.config.fields import split_list
from minialign.config.online import OnlineConfig
from minialign.data import PreferencePair, flat_sizes, sequence_lengths, tokenize_pairs
from minialign.data.splits import load_pairs
from minialign.evaluation.evasion import evades
from minialign.evaluation.judge import load_judge
from minialign.evaluation.textmetrics import loops
from minialign.modeling.blocks import check_fast_path
from minialign.modeling.generate import generate, resolve_decoder
from minialign.modeling.models import default_tokenizer, load_tokenizer
from minialign.training import checkpoint
from minialign.training.tasks import cached_reference, reference_table
from minialign.training.timing import Stopwatch
from minialign.training.train import train, use_varlen

KIND = "online"
# What a resume may change: more rounds, and switches that leave the rounds done valid (how rows are batched for
# decoding and scoring, logging, speed); any other change would mix two settings in one run.
RESUME_SAFE = (*resume_rules.SAFE, "rounds", "gen_batch_size", "rm_batch_size")
GEN_BATCH_CUDA = 256  # rows a round decodes at once on a GPU (see gen_batch_size)


@dataclasses.dataclass
class Session:
    """What every round uses: loaded once, kept for the whole run."""

    cfg: OnlineConfig
    run_dir: Path
    device: torch.device
    tokenizer: object
    model: torch.nn.Module  # the HF model being trained (generates the answers)
    policy: torch.nn.Module  # its TokenLogps wrapper (trains)
    task: object
    reference: object  # the starting model's log-probs: fixed for every round
    judges: list
    prompts: list[Prompt]
    held_out: list


def online(cfg: OnlineConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run (or continue) `minialign online`; every input is checked before the run folder is written."""
    if dist.launched_world() > 1:
        raise UserError("`minialign online` runs in one process (it generates with the model it trains); launch it "
                        "without torchrun.")
    if cfg.sft and not resume:
        recipes.adopt_sft_run(cfg)
    cfg.validate()
    clock = Stopwatch()
    device = resolve_device(cfg.device)
    cfg.apply_fast(device.type, 1)
    if cfg.attention == "flex" and device.type != "cuda":
        raise UserError("--attention flex needs a CUDA device (FlexAttention has no backward on a CPU); use auto or sdpa.")
    with clock.phase("load"):
        label = cfg.tokenizer or default_tokenizer(cfg.model)
        tokenizer = load_tokenizer(label, cache=cfg.cache)
    models = check_reward_models(cfg, tokenizer, label)
    with clock.phase("tokenize"):
        prompts = load_prompts(cfg, tokenizer)
        _, eval_pairs = load_pairs(cfg, tokenizer)
        held_out = tokenize_pairs(eval_pairs, tokenizer, max_length=cfg.max_length,
                                  max_prompt_length=cfg.max_prompt_length)
    run_dir = open_run_dir(cfg, resume=resume, overwrite=overwrite)
    done = completed_rounds(run_dir)
    print(f"minialign online: {cfg.model}, {'full fine-tuning' if cfg.full else f'LoRA r={cfg.lora_r}'}; "
          f"{len(prompts)} prompts, {cfg.rounds} round(s) of {cfg.prompts_per_round or len(prompts)} prompts x "
          f"{cfg.samples} answers; {len(models)} reward model(s), {cfg.combine}; run folder {run_dir}"
          + (f"; resuming after round {done}" if done else ""))
    with clock.phase("load"):
        model = recipes.dpo_start_model(cfg, tokenizer)
        check_fast_path(cfg, model, device)
        task = recipes.dpo_task(cfg)
        policy, reference = recipes.dpo_policy(model, cfg, device, task)
        if done:
            load_round_weights(run_dir, done, model)
        judges = [load_judge(m["run_dir"], device=device) for m in models]
    s = Session(cfg, run_dir, device, tokenizer, model, policy, task, reference, judges, prompts, held_out)
    for k in range(done + 1, cfg.rounds + 1):
        stats = run_round(s, k)
        rebuild_outputs(run_dir, cfg, models, clock.summary())
        print(round_line(stats, cfg.rounds, models))
    with clock.phase("save"):
        recipes.save_final(model, run_dir, cfg, tokenizer)
    summary = rebuild_outputs(run_dir, cfg, models, clock.summary())
    t = summary["time"]
    print(f"minialign online: done, {summary['completed_rounds']} round(s) in {t['wall_s']:.1f} s (generate "
          f"{t['generate_s']:.1f} s, score {t['score_s']:.1f} s, train {t['train_s']:.1f} s); final weights in "
          f"{run_dir / 'final'}, rounds in {run_dir / 'rounds.jsonl'}, report {run_dir / 'report.md'}")
    return run_dir


def open_run_dir(cfg: OnlineConfig, *, resume: bool, overwrite: bool) -> Path:
    """The run folder: an existing online run to resume, or a new one (config.yaml and kind written)."""
    run_dir = Path(cfg.out)
    if resume:
        kind_file = run_dir / "kind"
        kind = kind_file.read_text().strip() if kind_file.is_file() else None
        if kind != KIND:
            raise UserError(f"--resume {run_dir} is not a `minialign online` run folder (its 'kind' file says "
                            f"{kind!r}); resume it with its own command, or start an online run with --out.")
        resume_rules.resume_changes(cfg, KIND, safe=RESUME_SAFE)
        return resume_rules.open_run_dir(cfg, KIND, resume=True, overwrite=False, safe=RESUME_SAFE)
    if overwrite:
        for old in [*run_dir.glob("round-*"), run_dir / "rounds.jsonl", run_dir / "report.md", run_dir / "report.html",
                    run_dir / "plots"]:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    cfg.reward_models = ",".join(str(Path(p).resolve()) for p in split_list(cfg.reward_models))
    return folders.prepare_run_dir(cfg, KIND, overwrite=overwrite)


# ----------------------------------------------------------------------------- one round


def run_round(s: Session, k: int) -> dict:
    """Sample, score, pair and train round ``k``; write its folder with the completion marker last."""
    cfg = s.cfg
    folder = round_dir(s.run_dir, k)
    shutil.rmtree(folder, ignore_errors=True)  # a round killed earlier starts over
    folder.mkdir(parents=True)
    picked = [s.prompts[i] for i in round_prompts(len(s.prompts), cfg.prompts_per_round, k, cfg.seed)]
    n = cfg.samples
    t0 = time.perf_counter()
    completions = sample_answers(s, [p.text for p in picked], k)
    texts = [c.text.strip() if cfg.chat_template else c.text for c in completions]  # as chat training data is
    t1 = time.perf_counter()
    raw = [p.raw for p in picked for _ in range(n)]
    routes = torch.tensor([p.route for p in picked for _ in range(n)])
    scores = score_answers(s.judges, raw, texts, routes if cfg.combine == "route" else None,
                           cfg.rm_batch_size)  # [M, P * N]
    raw_combined = combine_scores(scores, cfg.weights(), cfg.combine, routes)
    looped, evaded = [loops(t) for t in texts], [evades(t) for t in texts]
    penalties = {"penalised": (looped, cfg.loop_penalty),  # rounds.jsonl's count -> (flags, what each loses)
                 "penalised_evasion": (in_scope(evaded, routes.tolist(), cfg.evasion_route_ids()), cfg.evasion_penalty),
                 "penalised_cut": ([not c.finished for c in completions], cfg.missing_eos_penalty)}
    combined = raw_combined
    for flags, penalty in penalties.values():
        combined = penalise(combined, flags, penalty)
    t2 = time.perf_counter()
    grouped = [texts[i * n : (i + 1) * n] for i in range(len(picked))]
    pairing = form_pairs(combined.reshape(len(picked), n), grouped, cfg.min_gap)
    check_pairs(len(pairing.pairs), pairing, len(picked), cfg, k)
    records = []
    for pair in pairing.pairs:
        p, c, r = picked[pair.prompt], pair.prompt * n + pair.chosen, pair.prompt * n + pair.rejected
        records.append({"row": p.row, "prompt": p.text, "raw_prompt": p.raw, "chosen": texts[c], "rejected": texts[r],
                        "scores": {"chosen": combined[c].item(), "rejected": combined[r].item(), "gap": pair.gap,
                                   "per_model": {"chosen": _json_scores(scores[:, c]),
                                                 "rejected": _json_scores(scores[:, r])}}})
    write_atomic(folder / "pairs.jsonl", "".join(json.dumps(x) + "\n" for x in records).encode())
    samples = [{"row": picked[i // n].row, "sample": i % n, "text": texts[i], "n_tokens": c.n_tokens, "stop": c.stop,
                "loops": looped[i], "evades": evaded[i], "scores": _json_scores(scores[:, i]),
                "combined": combined[i].item()} for i, c in enumerate(completions)]
    write_atomic(folder / "samples.jsonl", "".join(json.dumps(x) + "\n" for x in samples).encode())
    last = train_round(s, k, [PreferencePair(x["prompt"], x["chosen"], x["rejected"]) for x in records], folder)
    t3 = time.perf_counter()
    save_round_weights(s.run_dir, k, s.model, cfg.keep_last)
    stats = {"round": k, "prompts": len(picked), "answers": len(texts), "pairs": len(records),
             "below_gap": pairing.below_gap, "no_contrast": pairing.no_contrast,
             **{name: sum(flags) if penalty > 0 else 0 for name, (flags, penalty) in penalties.items()},
             "evasion_share": sum(evaded) / len(evaded),
             "score_mean": raw_combined.mean().item(),
             **rm_means(scores, cfg),
             "gap_mean": sum(x.gap for x in pairing.pairs) / len(pairing.pairs),
             **answer_stats(texts, [c.n_tokens for c in completions], [c.stop for c in completions], looped),
             "loss": last.get("loss"), **{k_: v for k_, v in last.items() if k_.startswith("eval/")},
             "generate_s": round(t1 - t0, 3), "score_s": round(t2 - t1, 3), "train_s": round(t3 - t2, 3)}
    write_atomic(folder / ROUND_DONE, json.dumps(stats).encode())  # the completion marker: written last
    return stats


def score_answers(judges: list, raw: list[str], texts: list[str], routes: torch.Tensor | None,
                  batch_size: int = 32) -> torch.Tensor:
    """``[M, K]`` float32: reward model (``Judge``) m's score of answer k to raw prompt k. With ``routes`` ``[K]``
    (``--combine route``) a model scores only the answers routed to it, the rest NaN: the others' scores would be
    discarded, and with two models scoring everything took twice the time. TRL's peer scores through it too."""
    if routes is None:
        return torch.stack([j.score(raw, texts, batch_size=batch_size) for j in judges])
    out = torch.full((len(judges), len(texts)), float("nan"))
    for m, judge in enumerate(judges):
        mine = (routes == m).nonzero().flatten().tolist()
        if mine:
            out[m, mine] = judge.score([raw[i] for i in mine], [texts[i] for i in mine], batch_size=batch_size)
    return out


def _json_scores(column: torch.Tensor) -> list[float | None]:
    """One answer's scores by each model, ``None`` where a model did not score it (JSON has no NaN)."""
    return [None if v != v else v for v in column.tolist()]


def gen_batch_size(cfg: OnlineConfig, device: torch.device) -> int | None:
    """Rows decoded at once: ``--gen-batch-size``, else ``GEN_BATCH_CUDA`` on a GPU (a round decodes thousands of
    answers; the decoder's new tokens/s at 256 rows was 2.5x that at 64 on an H100, results/decode-h100.json), else
    generate's own default (None)."""
    if cfg.gen_batch_size:
        return cfg.gen_batch_size
    return GEN_BATCH_CUDA if device.type == "cuda" else None


def sample_answers(s: Session, prompts: list[str], k: int) -> list:
    """``--samples`` completions of each prompt in prompt-major order: all sampled, or with ``--greedy-sample`` the
    greedy one first and N-1 sampled after it."""
    cfg = s.cfg
    decoder = resolve_decoder(s.model, "auto")  # one decoder for both calls
    common = dict(max_new_tokens=cfg.max_new_tokens, batch_size=gen_batch_size(cfg, s.device), details=True,
                  decoder=decoder)
    n_sampled = cfg.samples - cfg.greedy_sample
    sampled = generate(s.model, s.tokenizer, prompts, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                       seed=cfg.seed + k, num_samples=n_sampled, **common)
    if not cfg.greedy_sample:
        return sampled
    greedy = generate(s.model, s.tokenizer, prompts, do_sample=False, **common)
    return [c for i, g in enumerate(greedy) for c in (g, *sampled[i * n_sampled : (i + 1) * n_sampled])]


def rm_means(scores: torch.Tensor, cfg: OnlineConfig) -> dict:
    """``rm_scores``: each reward model's mean over the answers it scored (None: none). Under --combine route those
    are the answers routed to it, its axis's progress on its own prompts."""
    return {"rm_scores": dict(zip(split_list(cfg.reward_models), _json_scores(scores.double().nanmean(1)), strict=True))}


def check_pairs(kept: int, pairing, n_prompts: int, cfg: OnlineConfig, k: int) -> None:
    """A round must keep enough pairs for one optimiser step; say why it did not and what to change."""
    need = cfg.batch_size * cfg.grad_accum
    if kept >= need:
        return
    why = (f"{pairing.below_gap} prompt(s) had a best-minus-worst score gap below --min-gap {cfg.min_gap:g} and "
           f"{pairing.no_contrast} had answers that all scored alike (or were identical)")
    if kept == 0:
        raise UserError(f"Round {k} kept no pair out of {n_prompts} prompts: {why}. Lower --min-gap (0 keeps every "
                        "prompt with any score difference), raise --samples or --temperature for more varied "
                        "answers, or use more prompts (--prompts-per-round, --train-rows).")
    raise UserError(f"Round {k} kept {kept} pair(s) out of {n_prompts} prompts ({why}), but one optimiser step needs "
                    f"{need} (--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}). Lower --batch-size, "
                    "lower --min-gap, or use more prompts per round (--prompts-per-round, --train-rows).")


def train_round(s: Session, k: int, pairs: list[PreferencePair], folder: Path) -> dict:
    """DPO on the round's pairs with the shared loop, its metrics in ``folder``: the policy continues from the
    previous round's weights; optimizer and schedule start afresh; the reference is the starting model."""
    cfg = dataclasses.replace(s.cfg, seed=s.cfg.seed + k, save_every=0)  # a round is redone whole on resume
    items = tokenize_pairs(pairs, s.tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    both = [*items, *s.held_out]  # one index space, as recipes.dpo: a reference table covers both
    collate = recipes.pair_collate(both, cfg, s.tokenizer.pad_token_id)
    n, bs = len(items), cfg.batch_size
    s.task.reference = s.reference
    if cfg.precompute_ref and cfg.loss_type != "simpo":
        batches = (collate(list(range(i, min(i + bs, len(both))))) for i in range(0, len(both), bs))
        s.task.reference = cached_reference(reference_table(s.policy, s.reference, batches, len(both), s.device,
                                                            cfg.pad_targets_to_multiple_of,
                                                            varlen=use_varlen(cfg, s.device)))
    eval_batches = [collate(list(range(n + i, n + min(i + bs, len(s.held_out))))) for i in range(0, len(s.held_out), bs)]
    sizes = flat_sizes(items, share_prompt=cfg.share_prompt) if cfg.padding_free else None
    torch.manual_seed(cfg.seed)  # dropout of this round: the same whether or not the run was resumed
    return train(s.policy, s.task, range(n), collate, cfg, folder, eval_batches=eval_batches,
                 lengths=sequence_lengths(items), sizes=sizes)


# ----------------------------------------------------------------------------- weights between rounds


def save_round_weights(run_dir: Path, k: int, model: torch.nn.Module, keep_last: int) -> Path:
    """The trained weights after round ``k`` (LoRA adapters, or every weight with --full) as
    ``checkpoints/round-000k``, written as ``.tmp`` and renamed; rounds older than the last ``keep_last`` pruned."""
    root = run_dir / "checkpoints"
    final = root / f"round-{k:04d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(checkpoint.trainable_state(model), str(tmp / "trainable.safetensors"))
    (tmp / "progress.json").write_text(json.dumps({"round": k}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    checkpoint.fsync_path(root)
    for old in root.glob("round-*"):
        if not old.name.endswith(".tmp") and int(old.name.split("-")[1]) <= k - keep_last:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_round_weights(run_dir: Path, k: int, model: torch.nn.Module) -> None:
    """Put the weights saved after round ``k`` back into ``model`` (adapters attached, as when they were saved)."""
    path = run_dir / "checkpoints" / f"round-{k:04d}" / "trainable.safetensors"
    if not path.is_file():
        raise UserError(f"Round {k} of {run_dir} is complete but its weights ({path}) are missing, so the run "
                        "cannot continue from it. Start over with --overwrite.")
    weights = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in weights]
    if missing or any(name not in params or params[name].shape != w.shape for name, w in weights.items()):
        raise UserError(f"{path} does not fit this model (e.g. {missing[:2]}); start over with --overwrite.")
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)


def round_line(stats: dict, rounds: int, models: list[dict]) -> str:
    """The terminal line of one round."""
    names = [Path(m["run_dir"]).name for m in models]
    scores = ", ".join(f"{name} {'-' if v is None else f'{v:.3f}'}"  # None: routed no answer this round
                       for name, v in zip(names, stats["rm_scores"].values(), strict=True))
    return (f"minialign online: round {stats['round']}/{rounds}: {stats['prompts']} prompts, {stats['pairs']} pairs "
            f"({stats['below_gap']} below --min-gap, {stats['no_contrast']} without contrast); mean score {scores}; "
            f"loops {stats['loop_share']:.2f}, EOS {stats['eos_share']:.2f}, {stats['mean_tokens']:.1f} tokens; "
            f"generate {stats['generate_s']:.1f} s, score {stats['score_s']:.1f} s, train {stats['train_s']:.1f} s")
