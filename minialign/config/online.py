"""`minialign online`'s config: the DPO config plus sampling, scoring (reward models, how their scores combine, the
penalties for looping and evading answers) and rounds."""

from __future__ import annotations

import math
from dataclasses import dataclass

from minialign.base.errors import UserError
from minialign.config.fields import opt, split_list
from minialign.config.schema import DPOConfig


@dataclass
class OnlineConfig(DPOConfig):
    """`minialign online`: iterative on-policy DPO. Each round samples answers from the current policy, scores them
    with reward models, and trains DPO on best-vs-worst pairs against the fixed starting model."""

    reward_models: str = opt("", "reward models (`minialign rm` run folders, comma-separated) that score the sampled "
                             "answers", group="online", metavar="RM1[,RM2...]")
    rm_weights: str = opt("", "weight of each reward model in the combined score, comma-separated in --reward-models "
                          "order; empty: 1/M each", group="online", metavar="W1[,W2...]")
    combine: str = opt("zsum", "zsum: each reward model's scores standardised over the round's samples (mean 0, std "
                       "1), then the weighted sum; sum: the weighted sum of raw scores; route: each prompt's answers "
                       "scored by the one reward model --rm-routes gives its row (standardised over the answers "
                       "routed to that model)", group="online", choices=("zsum", "sum", "route"))
    rm_routes: str = opt("", "with --combine route: one value of --route-field per reward model, comma-separated in "
                         "--reward-models order; a prompt whose row holds a model's value is scored by that model",
                         group="online", metavar="V1[,V2...]")
    route_field: str = opt("source", "with --combine route: the training rows' field that names their reward model",
                           group="online", metavar="FIELD")
    rounds: int = opt(3, "rounds of sample -> score -> pair -> train", group="online", metavar="R")
    prompts_per_round: int = opt(0, "prompts sampled per round: 0 every training prompt each round; else the next P "
                                 "of one seeded shuffle of them (fresh prompts each round until they run out)",
                                 group="online", metavar="P")
    samples: int = opt(4, "answers sampled per prompt (>= 2): the best and worst by combined score form its pair",
                       group="online", metavar="N")
    temperature: float = opt(0.7, "sampling temperature of the answers", group="online")
    top_p: float = opt(1.0, "nucleus sampling top-p of the answers (1: off)", group="online")
    max_new_tokens: int = opt(128, "new tokens at most per sampled answer", group="online")
    min_gap: float = opt(0.0, "skip a prompt whose best-minus-worst combined score is below this (>= 0); a prompt "
                         "whose answers all score alike is always skipped", group="online", metavar="G")
    loop_penalty: float = opt(0.0, "subtracted from the combined score of each sampled answer that loops (a 4-word "
                              "sequence 3 times or more, the loop share's rule): 4 puts nearly every looping answer "
                              "below the others under zsum, 100 all of them (>= 0; 0: off)", group="online",
                              metavar="L")
    evasion_penalty: float = opt(0.0, "subtracted from the combined score of each sampled answer that declines or "
                                 "deflects (the evasion share's rule), so that refusing stops winning pairs; on every "
                                 "prompt unless --evasion-routes names some (>= 0; 0: off)", group="online", metavar="E")
    missing_eos_penalty: float = opt(0.0, "subtracted from the combined score of each sampled answer cut at "
                                     "--max-new-tokens before it ended (TRL's missing_eos_penalty): reward models "
                                     "never saw a cut answer in training and score them erratically, some above "
                                     "finished ones (>= 0; 0: off)", group="online", metavar="C")
    evasion_routes: str = opt("", "with --combine route: the --rm-routes values whose prompts --evasion-penalty "
                              "applies to (e.g. helpful-base: declining a harmful request is not penalised); empty: "
                              "every prompt", group="online", metavar="V1[,V2...]")
    greedy_sample: bool = opt(False, "decode each prompt's first answer greedily and sample the other N-1: the "
                              "answer greedy evaluation sees then takes part in its prompt's pair (a greedy answer "
                              "that loops becomes the rejected one), where sampled answers loop less than it",
                              group="online")
    gen_batch_size: int = opt(0, "rows decoded at once (0: 256 on CUDA, 8 on CPU)", group="online")
    rm_batch_size: int = opt(64, "answers a reward model scores at once", group="online")
    out: str = opt("runs/online", "run folder", group="output", metavar="DIR")

    def validate(self) -> None:
        super().validate()
        checks = [
            (bool(split_list(self.reward_models)), "--reward-models is required: one or more `minialign rm` run "
             "folders, comma-separated (train one with `minialign rm --out DIR`)"),
            (self.samples >= 2, f"--samples must be >= 2 (got {self.samples}): a pair needs a best and a worst "
             "answer of the same prompt"),
            (self.min_gap >= 0, f"--min-gap must be >= 0 (got {self.min_gap:g}); 0 keeps every prompt whose answers "
             "differ in score"),
            (math.isfinite(self.loop_penalty) and self.loop_penalty >= 0, f"--loop-penalty must be a finite number "
             f">= 0 (got {self.loop_penalty:g}): it lowers the score of answers that loop; 0 turns it off"),
            (math.isfinite(self.evasion_penalty) and self.evasion_penalty >= 0, f"--evasion-penalty must be a finite "
             f"number >= 0 (got {self.evasion_penalty:g}): it lowers the score of answers that decline or deflect; 0 "
             "turns it off"),
            (math.isfinite(self.missing_eos_penalty) and self.missing_eos_penalty >= 0, f"--missing-eos-penalty "
             f"must be a finite number >= 0 (got {self.missing_eos_penalty:g}): it lowers the score of answers cut at "
             "--max-new-tokens; 0 turns it off"),
            (self.rounds >= 1, f"--rounds must be >= 1 (got {self.rounds})"),
            (self.prompts_per_round >= 0, f"--prompts-per-round must be >= 0 (got {self.prompts_per_round}; 0: "
             "every training prompt each round)"),
            (self.temperature > 0, f"--temperature must be > 0 (got {self.temperature:g}): answers are sampled"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p:g})"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})"),
            (self.gen_batch_size >= 0, "--gen-batch-size must be >= 0 (0: automatic)"),
            (self.rm_batch_size >= 1, "--rm-batch-size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"Invalid configuration: {message}.")
        self.weights()
        self.evasion_route_ids()

    def routes(self) -> list[str]:
        """--rm-routes as a list, one value per reward model (empty unless --combine route)."""
        models, routes = split_list(self.reward_models), split_list(self.rm_routes)
        if self.combine == "route" and not self.route_field.strip():
            raise UserError("Invalid configuration: --route-field is empty; name the training rows' field whose value "
                            "picks each prompt's reward model (default: source).")
        if self.combine != "route":
            if routes:
                raise UserError(f"Invalid configuration: --rm-routes applies only with --combine route (got --combine "
                                f"{self.combine}); add --combine route or drop --rm-routes.")
            return []
        if len(routes) != len(models) or len(set(routes)) != len(routes):
            raise UserError(f"Invalid configuration: --combine route needs --rm-routes with one distinct value of "
                            f"--route-field {self.route_field!r} per reward model, in --reward-models order; got "
                            f"{len(routes)} value(s) ({self.rm_routes!r}) for {len(models)} reward model(s), e.g. "
                            "--rm-routes harmless-base,helpful-base.")
        if split_list(self.rm_weights):
            raise UserError("Invalid configuration: --rm-weights does not apply with --combine route (each prompt is "
                            "scored by one reward model); drop --rm-weights.")
        return routes

    def evasion_route_ids(self) -> list[int] | None:
        """The reward-model (route) indices whose prompts --evasion-penalty applies to; None: every prompt."""
        routes, named = self.routes(), split_list(self.evasion_routes)
        if not named:
            if self.evasion_routes.strip():  # only commas: a scope was asked for but names nothing
                raise UserError(f"Invalid configuration: --evasion-routes {self.evasion_routes!r} names no route; give "
                                "values of --rm-routes, or leave it empty to penalise evasion on every prompt.")
            return None
        problem = ("it needs --combine route (each prompt routed to one reward model)" if self.combine != "route" else
                   "it needs an --evasion-penalty above 0" if self.evasion_penalty <= 0 else
                   f"{', '.join(v for v in named if v not in routes)} not among --rm-routes ({self.rm_routes})"
                   if set(named) - set(routes) else None)
        if problem:
            raise UserError(f"Invalid configuration: --evasion-routes {self.evasion_routes!r}: {problem}.")
        return sorted({routes.index(v) for v in named})

    def weights(self) -> list[float]:
        """The weight of each reward model: --rm-weights, else 1/M each."""
        models, given = split_list(self.reward_models), split_list(self.rm_weights)
        if not given:
            return [1.0 / len(models)] * len(models) if models else []
        try:
            weights = [float(w) for w in given]
        except ValueError:
            raise UserError(f"Invalid configuration: --rm-weights {self.rm_weights!r} must be numbers, comma-separated "
                            "(e.g. 0.7,0.3).") from None
        if len(weights) != len(models):
            raise UserError(f"Invalid configuration: --rm-weights gives {len(weights)} weight(s) but --reward-models "
                            f"names {len(models)} reward model(s); give one weight per reward model, in the same "
                            "order, or leave --rm-weights empty for equal weights.")
        return weights
