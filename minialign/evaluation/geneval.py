"""Generation-level comparison of a policy with its reference: the one code path behind `minialign eval`
and the "Generation" section of `minialign run`'s report.

Both models answer the same held-out prompts greedily and by sampling (several answers a prompt); the
answers are measured with ``textmetrics`` (loops, distinct-2, finished share, length) and, when a judge
(a reward model from `minialign rm`) is given, scored, and the policy's win rate over the reference is
computed with its confidence interval. Everything is kept per prompt, with the prompt's raw row index,
so a sample can be named by its row ("row 3") and any number re-derived from eval.json.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from minialign.evaluation.evasion import evades
from minialign.evaluation.textmetrics import distinct_n, loops, mean, share, win_rate
from minialign.modeling import lora
from minialign.modeling.generate import Completion, generate

SIDES = ("reference", "policy")


@dataclass(frozen=True)
class EvalPrompt:
    """A held-out prompt: ``text`` as the models see it (chat template applied when the policy was
    trained with one), ``raw`` as the dataset holds it (HH dialogue), ``row`` its raw row index."""

    text: str
    raw: str
    row: int


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded. Greedy always; ``samples`` sampled answers a prompt (0: none)."""

    max_new_tokens: int = 128
    samples: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    batch_size: int | None = None  # None: 128 rows on CUDA, 8 elsewhere


def decode(model, tokenizer, prompts: list[str], decoding: Decoding,
           seconds: dict[str, float] | None = None) -> dict[str, list[list[Completion]]]:
    """``{"greedy": [[c]] * N, "sampled": [[c_1..c_S]] * N}``: answers grouped by prompt; ``seconds`` gets each
    decoding's wall time (the texts are on the host when ``generate`` returns, so no sync is missing)."""
    common = dict(max_new_tokens=decoding.max_new_tokens, batch_size=decoding.batch_size, details=True)
    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    out = {"greedy": [[c] for c in generate(model, tokenizer, prompts, **common)]}
    seconds["greedy"] = seconds.get("greedy", 0.0) + time.perf_counter() - t0
    if decoding.samples > 0:
        t0 = time.perf_counter()
        flat = generate(model, tokenizer, prompts, do_sample=True, temperature=decoding.temperature,
                        top_p=decoding.top_p, seed=decoding.seed, num_samples=decoding.samples, **common)
        seconds["sampled"] = seconds.get("sampled", 0.0) + time.perf_counter() - t0
        s = decoding.samples
        out["sampled"] = [flat[i * s : (i + 1) * s] for i in range(len(prompts))]
    return out


def answer_metrics(groups: list[list[Completion]]) -> dict[str, float]:
    """Loop share, evasion share (``evasion.evades``), distinct-2, finished (EOS or stop string) share and mean
    length over all answers."""
    answers = [c for group in groups for c in group]
    return {
        "loop_share": share([loops(c.text) for c in answers]),
        "evasion_share": share([evades(c.text) for c in answers]),
        "distinct_2": distinct_n([c.text for c in answers], 2),
        "finished_share": share([c.finished for c in answers]),
        "mean_tokens": mean([c.n_tokens for c in answers]),
        "n_answers": len(answers),
    }


def score_answers(judge, prompts: list[EvalPrompt], groups: list[list[Completion]], batch_size: int) -> torch.Tensor:
    """Judge scores ``[N, S]`` of each prompt's answers (S = 1 for greedy).

    The judge gets each prompt as the dataset holds it (``raw``, HH text), never the policy's chat-formatted
    ``text``: ``Judge.score`` alone puts it in the form the judge trained on (its own chat template, or HH text),
    so a judge reads the same text whichever template the policy used.
    """
    raw = [p.raw for p, group in zip(prompts, groups, strict=True) for _ in group]
    scores = judge.score(raw, [c.text for group in groups for c in group], batch_size=batch_size)
    return torch.as_tensor(scores, dtype=torch.float32).reshape(len(groups), -1)


def compare(policy, reference, tokenizer, prompts: list[EvalPrompt], decoding: Decoding, *, judge=None,
            judge_batch_size: int = 32, judge_context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Answers of both models to ``prompts``, their metrics, and (with a judge) scores and win rates.

    ``reference=None`` means the policy with its LoRA adapters switched off, which is the model a LoRA
    policy started from: one model in memory serves both sides. ``judge_context`` (which rows the judge
    and the policy trained on, the judge's held-out accuracy, overlap flags) is stored beside every win
    rate, because a win rate means little without it.
    """
    texts = [p.text for p in prompts]
    seconds: dict[str, float] = {}  # per decoding, both models together: what "N prompts x 2 models" costs
    answers = {"policy": decode(policy, tokenizer, texts, decoding, seconds)}
    if reference is None:
        with lora.disabled(policy):
            answers["reference"] = decode(policy, tokenizer, texts, decoding, seconds)
    else:
        answers["reference"] = decode(reference, tokenizer, texts, decoding, seconds)
    return {**summarize(prompts, answers, decoding, judge=judge, judge_batch_size=judge_batch_size,
                        judge_context=judge_context),
            "generation_s": {k: round(v, 3) for k, v in seconds.items()}}


def summarize(prompts: list[EvalPrompt], answers: dict[str, dict[str, list[list[Completion]]]], decoding: Decoding,
              *, judge=None, judge_batch_size: int = 32, judge_context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics, judge scores and win rates of ``answers[side][mode]`` (grouped by prompt), and every answer kept
    per prompt with its row: eval.json less the generation timings."""
    modes: dict[str, Any] = {}
    scores: dict[tuple[str, str], torch.Tensor] = {}
    for mode in answers["policy"]:
        entry: dict[str, Any] = {side: answer_metrics(answers[side][mode]) for side in SIDES}
        if judge is not None:
            for side in SIDES:
                scores[side, mode] = score_answers(judge, prompts, answers[side][mode], judge_batch_size)
                entry[side]["judge_score"] = scores[side, mode].double().mean().item()
            entry["win_rate"] = win_rate(scores["policy", mode], scores["reference", mode], seed=decoding.seed).as_dict()
            entry["win_rate"]["judge"] = dict(judge_context or {})
        modes[mode] = entry
    per_prompt = []
    for i, prompt in enumerate(prompts):
        record: dict[str, Any] = {"row": prompt.row, "prompt": prompt.text}
        if prompt.raw != prompt.text:  # what the judge read: the dataset's prompt, not the policy's template
            record["raw_prompt"] = prompt.raw
        for side in SIDES:
            record[side] = {mode: [_answer(c, scores.get((side, mode)), i) for c in answers[side][mode][i]]
                            for mode in answers[side]}
        per_prompt.append(record)
    return {"decoding": dataclasses.asdict(decoding), "n_prompts": len(prompts), "rows": [p.row for p in prompts],
            "judge": dict(judge_context or {}) if judge is not None else None, "modes": modes, "prompts": per_prompt}


def saved_answers(results: dict[str, Any]) -> tuple[list[EvalPrompt], dict[str, dict[str, list[list[Completion]]]],
                                                     Decoding]:
    """The prompts, answers and decoding stored in an eval.json (``compare``'s output), as ``summarize`` takes
    them: so a new judge can score the same answers without generating them again."""
    prompts = [EvalPrompt(r["prompt"], r.get("raw_prompt", r["prompt"]), r["row"]) for r in results["prompts"]]
    modes = list(results["prompts"][0]["policy"]) if results["prompts"] else []
    answers = {side: {mode: [[Completion(a["text"], a["n_tokens"], a["finished"], a["stop"], i, k)
                              for k, a in enumerate(r[side][mode])] for i, r in enumerate(results["prompts"])]
                      for mode in modes} for side in SIDES}
    return prompts, answers, Decoding(**results["decoding"])


def _answer(c: Completion, scores: torch.Tensor | None, i: int) -> dict[str, Any]:
    out = {"text": c.text, "n_tokens": c.n_tokens, "finished": c.finished, "stop": c.stop, "loops": loops(c.text),
           "evades": evades(c.text)}
    if scores is not None:
        out["judge_score"] = float(scores[i, c.sample])
    return out
