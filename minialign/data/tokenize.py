"""Turn text pairs into token ids, with the prompt/response boundary kept exact.

Prompt and response are tokenized separately and concatenated. Tokenizing ``prompt + response``
in one go lets BPE merge characters across the boundary (e.g. "Assistant: " + "Hello" can become
"Assistant:" + " Hello"), so the first response token would be partly prompt and the loss mask
would be off by one token. Keeping them apart makes the boundary a token boundary by construction,
and the same prompt ids are shared by the chosen and rejected sequences of a pair, as DPO assumes.

Each response ends with the tokenizer's EOS so that the model learns where to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from minialign.base.errors import UserError
from minialign.config.fields import TRUNCATIONS
from minialign.data.sources import PreferencePair


@dataclass
class TokenizedPair:
    """A preference pair as ids; both response id lists end with EOS unless truncated."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0  # the pair's PreferencePair.margin (reward models only)


@dataclass
class TokenizedExample:
    """An SFT example: the loss covers ``response_ids`` only."""

    prompt_ids: list[int]
    response_ids: list[int]


class TokenizedData(list):
    """A list of TokenizedPair or TokenizedExample plus ``truncated``: how many were cut to fit, and ``dropped``: how
    many were left out because no response token fit (``--truncation keep-start`` only)."""

    def __init__(self, items: Sequence[Any] = (), *, truncated: int = 0, dropped: int = 0) -> None:
        super().__init__(items)
        self.truncated, self.dropped = truncated, dropped


def truncate(
    prompt_ids: list[int], responses: Sequence[list[int]], *, max_length: int, max_prompt_length: int
) -> tuple[list[int], list[list[int]], bool]:
    """Fit a prompt and its response(s) into ``max_length`` tokens each.

    The prompt keeps its *end* (the latest turns, which the response answers) down to
    ``max_prompt_length``; then each response is cut at its end so that prompt + response fits.
    A cut response loses its EOS, which is right: the text did not end there. Returns the new
    prompt, the new responses and whether anything was cut.
    """
    prompt = prompt_ids[-max_prompt_length:] if len(prompt_ids) > max_prompt_length else prompt_ids
    room = max_length - len(prompt)
    cut = [r[:room] for r in responses]
    was_cut = len(prompt) < len(prompt_ids) or any(len(c) < len(r) for c, r in zip(cut, responses))
    return list(prompt), cut, was_cut


def check_limits(tokenizer: Any, max_length: int, max_prompt_length: int) -> int:
    """Validate the length limits and return the EOS id, explaining any problem to the user."""
    if max_prompt_length < 1 or max_length <= max_prompt_length:
        raise UserError(
            f"max_prompt_length={max_prompt_length} must be at least 1 and smaller than "
            f"max_length={max_length}, so that every response keeps at least one token."
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError(
            "the tokenizer has no EOS token, so responses cannot be ended; set one (e.g. "
            "tokenizer.eos_token = '<|endoftext|>') or load the tokenizer with eos_token=..."
        )
    return int(eos)


def encode(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each text, without BOS/EOS or other special tokens (one batched call: fast)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def tokenize_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Any, *, max_length: int, max_prompt_length: int
) -> TokenizedData:
    """Tokenize preference pairs for DPO: one prompt, two EOS-terminated responses, truncated to fit."""
    eos = check_limits(tokenizer, max_length, max_prompt_length)
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    prompts = encode([p.prompt for p in pairs], tokenizer)
    chosen = encode([p.chosen for p in pairs], tokenizer)
    rejected = encode([p.rejected for p in pairs], tokenizer)
    out, truncated = [], 0
    for pair, p, c, r in zip(pairs, prompts, chosen, rejected):
        p, (c, r), was_cut = truncate(p, [c + [eos], r + [eos]], **limits)
        out.append(TokenizedPair(p, c, r, pair.margin))
        truncated += was_cut
    return TokenizedData(out, truncated=truncated)


def tokenize_sft(
    pairs: Sequence[PreferencePair], tokenizer: Any, *, max_length: int, max_prompt_length: int,
    truncation: str = "prompt", label: str = "training",
) -> TokenizedData:
    """Tokenize the chosen side of each pair as an SFT example (prompt + chosen response + EOS).

    ``truncation``: "prompt" cuts a long example as ``truncate`` does (the prompt keeps its end, the response the
    room left); "keep-start" keeps an example's first ``max_length`` tokens, whole prompt first, and leaves out an
    example whose prompt alone fills them (no response token would be trained): TRL's SFT default, for runs that
    must see the same tokens as TRL's (``max_prompt_length`` is not used). The same ids as TRL's where its tokenizer
    adds no special tokens (TRL's call adds a BOS where the tokenizer does: Llama 3, Mistral), no tokens merge across
    the prompt/response boundary (TRL tokenizes them jointly) and the response does not already end with the EOS text
    (TRL then adds none); TRL skips the cut when packing, minialign cuts before packing.
    """
    eos = check_limits(tokenizer, max_length, max_prompt_length)
    if truncation not in TRUNCATIONS:
        raise UserError(f"truncation is {truncation!r}; it must be one of {', '.join(TRUNCATIONS)}.")
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    prompts = encode([p.prompt for p in pairs], tokenizer)
    responses = encode([p.chosen for p in pairs], tokenizer)
    out, truncated, dropped = [], 0, 0
    for p, r in zip(prompts, responses):
        r = r + [eos]
        if truncation == "keep-start":
            if len(p) >= max_length:
                dropped += 1
                continue
            r, was_cut = r[: max_length - len(p)], len(p) + len(r) > max_length
        else:
            p, (r,), was_cut = truncate(p, [r], **limits)
        out.append(TokenizedExample(p, r))
        truncated += was_cut
    if pairs and not out:
        raise UserError(f"With --truncation keep-start every one of the {len(pairs)} {label} examples has a prompt "
                        f"of at least --max-length {max_length} tokens, so none keeps a response token. Raise "
                        "--max-length or use --truncation prompt (the prompt keeps its end).")
    return TokenizedData(out, truncated=truncated, dropped=dropped)


MIN_TARGET_TOKENS = 2  # a response of one word and its EOS; fewer means the response text tokenized to nothing


def check_tokenized(items: Sequence[TokenizedExample | TokenizedPair], tokenizer: Any, label: str) -> None:
    """Refuse training data that tokenizes to (nearly) nothing: the median example (a pair: its shorter response)
    has fewer than ``MIN_TARGET_TOKENS`` target tokens, EOS included. A tokenizer that cannot read the text
    (e.g. the empty one transformers builds from a model folder without tokenizer files) makes every response
    its EOS alone: the loss would be constant and the gradient zero, and the run would say it trained."""
    if not items:
        return
    targets = sorted(len(x.response_ids) if isinstance(x, TokenizedExample)
                     else min(len(x.chosen_ids), len(x.rejected_ids)) for x in items)
    median = targets[len(targets) // 2]
    if median >= MIN_TARGET_TOKENS:
        return
    prompts = sorted(len(x.prompt_ids) for x in items)
    raise UserError(
        f"The training data tokenizes to almost nothing with tokenizer '{label}' ({type(tokenizer).__name__}, "
        f"a vocabulary of {len(tokenizer)}): the median example has {median} target token(s) (EOS "
        f"included; at least {MIN_TARGET_TOKENS} are needed) and {prompts[len(prompts) // 2]} prompt token(s), over "
        f"{len(items)} examples. Training on it would change nothing. Pass the tokenizer the model was trained with "
        "(--tokenizer; a minialign run saves it in RUN_DIR/final/tokenizer), and check the data with "
        "`minialign data SOURCE --tokenizer TOKENIZER`.")
