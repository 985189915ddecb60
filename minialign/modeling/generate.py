"""Batched text generation with stop strings, for evaluation samples and `minialign generate`.

The decoding itself is the model's own ``model.generate`` from transformers; this module only
does the parts that are easy to get subtly wrong around it:

- prompts are tokenized exactly like training tokenizes them (no BOS/EOS added), and left-padded
  so that every row's last real token sits at the same position and new tokens line up;
- the pad id falls back to EOS for tokenizers without a pad token (Pythia: pad = EOS = 0), and
  padding is described by the attention mask only, never by comparing token ids;
- completions are cut at EOS and at the first stop string (the start of the next "Human:" turn),
  so a sample never shows the model writing the user's next message;
- sampling is seeded on a forked RNG, so the same seed gives the same text and the caller's global
  random state (which drives data order and dropout during training) is left untouched;
- the model's train/eval flags are restored module by module, so generating mid-training is safe;
- prompts are sorted by length before batching (less left padding: a batch is as wide as its
  longest prompt) and the completions put back in the caller's order afterwards.

``generate(..., details=True)`` returns a ``Completion`` per answer (text, new-token count, and whether
it finished or ran into ``max_new_tokens``), which the generation metrics of ``minialign eval`` need.

``decoder`` picks what decodes: ``"auto"`` (the default) runs ``minialign.modeling.decoder.StaticDecoder`` (static cache,
CUDA-graph steps, finished rows retired) for the models it supports and transformers' ``generate`` otherwise;
``"static"`` insists on it, ``"hf"`` is transformers' ``generate`` with its dynamic cache, ``"hf-static"`` with its
static cache (which transformers compiles on a GPU). A ``StaticDecoder`` instance is reused as it is (its graphs
are recorded once; it refreshes its weights when the model's change).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from minialign.base.errors import UserError
from minialign.modeling.decoder import StaticDecoder
from minialign.modeling.decoder_model import decoder_support
from minialign.modeling.sampling import Sampling

DEFAULT_STOP_STRINGS: tuple[str, ...] = ("\n\nHuman:",)


CUDA_BATCH_SIZE = 128  # rows decoded at once on a GPU: 100 prompts x 2 models in a few batches
CPU_BATCH_SIZE = 8
DECODERS = ("auto", "static", "hf", "hf-static")


@dataclass(frozen=True)
class Completion:
    """One generated answer.

    ``n_tokens`` counts the new tokens that make up ``text``: those before the first EOS, and for an
    answer cut at a stop string only the tokens needed to produce the text before it (the stop string
    and the padding after it are not part of the answer). ``finished`` is True when the answer ended
    by itself (EOS or a stop string) and False when it ran into ``max_new_tokens``; ``stop`` says which
    ("eos", "stop" or "length"). ``prompt`` is the index of its prompt, ``sample`` its number among
    that prompt's ``num_samples`` answers.
    """

    text: str
    n_tokens: int
    finished: bool
    stop: str
    prompt: int = 0
    sample: int = 0


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    num_samples: int = 1,
    details: bool = False,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
    eos_token_id: int | Sequence[int] | None = None,
    decoder: str | StaticDecoder = "auto",
) -> list[str] | list[Completion]:
    """Complete each prompt and return only the new text, in the order of ``prompts``.

    Greedy by default (``do_sample=False``), which is what evaluation wants: deterministic and
    comparable between the reference and the trained policy. With ``do_sample=True`` the usual
    ``temperature`` / ``top_p`` / ``top_k`` (0 = off) apply and ``seed`` makes the result
    repeatable for a given ``batch_size`` and device. Each completion stops at EOS
    (``eos_token_id``, default: the tokenizer's) or at the first of ``stop_strings``; the stop
    string, anything after it and special tokens are not part of the returned text.

    ``num_samples`` answers per prompt are decoded in the same batches (prompt-major order: all of
    prompt 0's, then prompt 1's, ...); ``details=True`` returns ``Completion`` records instead of
    strings. ``batch_size`` defaults to 128 rows on CUDA and 8 elsewhere. Decoding keeps the KV
    cache on (each new token attends to cached keys, not a recomputed prefix). ``decoder``: see the module's
    docstring; greedy answers are transformers' (float32: the same tokens; bf16: nearly all), sampled ones follow
    the same distribution from a different random stream.
    """
    prompts = list(prompts)
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
    _check_arguments(prompts, max_new_tokens, temperature, top_p, top_k, batch_size, do_sample)
    if num_samples < 1:
        raise UserError(f"num_samples is {num_samples}; it must be at least 1 (answers per prompt).")
    if not prompts:
        return []
    eos_ids = _eos_ids(tokenizer, eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if isinstance(stop_strings, str):  # one string, not an iterable of one-character stops
        stop_strings = (stop_strings,)
    stop_strings = tuple(s for s in stop_strings if s)
    config = _generation_config(
        max_new_tokens, do_sample, temperature, top_p, top_k, eos_ids, pad_id, stop_strings
    )
    backend = resolve_decoder(model, decoder)
    encoded = _encode(tokenizer, prompts)
    # Rows are (prompt, sample) pairs, longest prompt first: each batch holds prompts of similar
    # length, so little of it is left padding. A stable sort keeps a prompt's samples together.
    rows = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    order = sorted(range(len(rows)), key=lambda r: -len(encoded[rows[r][0]]))
    results: list[Completion | None] = [None] * len(rows)
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    generator = torch.Generator().manual_seed(seed)  # the static decoder's uniforms, drawn on the CPU
    if backend == "hf-static":
        config.cache_implementation = "static"
    # no_grad rather than inference_mode: this runs mid-training too, and tensors a model caches
    # while generating (e.g. rotary tables) must stay usable by a later backward pass.
    with _eval_mode(model), _seeded_rng(seed, device), torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = [encoded[rows[r][0]] for r in chunk]
            if isinstance(backend, StaticDecoder):
                new_tokens = backend.decode(
                    batch, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, sampling=sampling,
                    generator=generator, stopped=_stop_check(tokenizer, stop_strings, backend.sync_every),
                )
            else:
                new_tokens = _hf_generate(model, tokenizer, batch, config, pad_id, device, stop_strings)
            for r, (text, n_tokens, stop) in zip(chunk, _decode_rows(tokenizer, new_tokens, eos_ids, stop_strings),
                                                 strict=True):
                results[r] = Completion(text, n_tokens, stop != "length", stop, *rows[r])
    return results if details else [c.text for c in results]  # every row filled above


def resolve_decoder(model: torch.nn.Module, decoder: str | StaticDecoder) -> str | StaticDecoder:
    """The decoder ``generate`` runs: a ``StaticDecoder``, or "hf" / "hf-static" (transformers' generate). Resolve
    once and pass the result as ``decoder=`` to share one static decoder (its graphs and cache) over several calls."""
    if isinstance(decoder, StaticDecoder):
        if decoder.model is not model:
            raise UserError("The StaticDecoder given as decoder= was built for another model; build one with "
                            "StaticDecoder(model) for this model, or pass decoder='auto'.")
        return decoder
    if decoder not in DECODERS:
        raise UserError(f"decoder is {decoder!r}; it must be one of {', '.join(DECODERS)} or a StaticDecoder.")
    if decoder == "static" or (decoder == "auto" and decoder_support(model) is None):
        return StaticDecoder(model)  # raises a UserError saying why for an unsupported model
    return "hf" if decoder == "auto" else decoder


def _hf_generate(model: torch.nn.Module, tokenizer, batch: list[list[int]], config: GenerationConfig, pad_id: int,
                 device: torch.device, stop_strings: tuple[str, ...]) -> list[list[int]]:
    """New token ids of each row from transformers' ``model.generate`` (left-padded batch)."""
    input_ids, attention_mask = _left_padded_batch(batch, pad_id)
    extra = {"tokenizer": tokenizer} if stop_strings else {}
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
        **extra,
    )
    return output[:, input_ids.shape[1] :].tolist()


def _stop_check(tokenizer, stop_strings: tuple[str, ...], sync_every: int):
    """For the static decoder: which rows' text holds a stop string, from the last tokens of each row only.

    A row's tail decodes to a piece of its text (a partial character at the cut becomes a replacement character, a
    leading space may be dropped), so a stop string found there is in the whole text too; the tail covers the steps
    since the previous check plus the longest stop string, so a missed one only delays the row's retirement.
    """
    if not stop_strings:
        return None
    window = 2 * sync_every + 4 * max(len(s) for s in stop_strings) + 8

    def stopped(rows: list[list[int]]) -> list[bool]:
        texts = texts_of(tokenizer, [ids[-window:] for ids in rows])
        return [any(s in text for s in stop_strings) for text in texts]

    return stopped


def _check_arguments(
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    batch_size: int,
    do_sample: bool,
) -> None:
    """Reject inputs that would otherwise fail deep inside transformers with a confusing message."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise UserError(
                f"Prompt number {i} is {prompt!r}, but every prompt must be a non-empty string: the "
                "model needs at least one token to continue from. Remove empty prompts or give them "
                "text (for a chat model, e.g. '\\n\\nHuman: ...\\n\\nAssistant:')."
            )
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens is {max_new_tokens}; it must be at least 1.")
    if batch_size < 1:
        raise UserError(f"batch_size is {batch_size}; it must be at least 1.")
    if do_sample and not temperature > 0:
        raise UserError(
            f"temperature is {temperature}, but sampling needs a temperature above 0. "
            "For deterministic output use greedy decoding (do_sample=False) instead."
        )
    if do_sample and not 0 < top_p <= 1:
        raise UserError(f"top_p is {top_p}; it must be in (0, 1], where 1 keeps every token.")
    if top_k < 0:
        raise UserError(f"top_k is {top_k}; it must be 0 (no top-k filtering) or a positive count.")


def _eos_ids(tokenizer, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The end-of-sequence ids as a list; a tokenizer without EOS needs the caller to name one."""
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise UserError(
            "The tokenizer has no end-of-sequence token, so generation would not know where a reply "
            "ends. Pass eos_token_id=... (the id that ends a reply for this model)."
        )
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


def _generation_config(
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_ids: list[int],
    pad_id: int,
    stop_strings: tuple[str, ...],
) -> GenerationConfig:
    """Settings for ``model.generate``.

    transformers fills every setting we leave unset from the checkpoint's generation_config.json,
    so the knobs that change what comes out (beams, repetition penalty, ...) are pinned here:
    samples then depend on our arguments, not on whatever the checkpoint ships with.
    """
    settings: dict = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_beams": 1,
        "use_cache": True,  # the KV cache: each new token attends to cached keys, the prefix is not recomputed
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "stop_strings": list(stop_strings) or None,
    }
    if do_sample:  # set only when used: transformers warns about sampling knobs under greedy decoding
        settings.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return GenerationConfig(**settings)


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, as training tokenizes them (no special tokens added)."""
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if not ids:
            raise UserError(f"Prompt {prompt!r} tokenizes to no tokens; give it some text.")
    return encoded


def _left_padded_batch(encoded: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, T]`` left-padded with ``pad_id``, and the mask (1 = real token).

    Padding by hand keeps the caller's tokenizer untouched (no temporary ``padding_side`` or
    ``pad_token`` changes that another thread or a later training step could observe), and works
    for tokenizers that define no pad token at all.
    """
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


# transformers' classes whose ``_decode`` is the Rust tokenizer's decode, plus an optional space clean-up
GENERIC_FAST = ("transformers.tokenization_utils_fast", "transformers.tokenization_utils_tokenizers")


def texts_of(tokenizer, rows: list[list[int]]) -> list[str]:
    """Each row's text, special tokens skipped: what ``tokenizer.decode`` gives for each. Where that is exactly the
    Rust tokenizer's decode (transformers' own fast class, no space clean-up), the Rust tokenizer decodes the batch
    at once, on every core: 256 answers of 128 tokens took 9.5 ms row by row through transformers on a 2-core CPU and
    3.6 ms so (benchmarks/NOTES.md entry 37); the GPU waits on this at the end of every batch."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True) or not _generic_decode(tokenizer):
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in rows]
    return backend.decode_batch(rows, skip_special_tokens=True)


def _generic_decode(tokenizer) -> bool:
    """Whether ``decode`` and ``_decode`` are transformers' own (the base class's ``decode`` calling the fast
    classes' ``_decode``): no subclass, remote code or instance patch replaces either."""
    if "decode" in vars(tokenizer) or "_decode" in vars(tokenizer):
        return False
    mro = type(tokenizer).__mro__
    owner = next((c for c in mro if "_decode" in c.__dict__), None)
    public = next((c for c in mro if "decode" in c.__dict__), None)
    return (owner is not None and owner.__module__ in GENERIC_FAST and public is not None
            and public.__module__ in (*GENERIC_FAST, "transformers.tokenization_utils_base"))


def _decode_rows(tokenizer, rows: list[list[int]], eos_ids: list[int],
                 stop_strings: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """Each row's text cut at its first EOS and then at the first stop string, the number of tokens that text took,
    and why it ended ("eos", "stop" or "length").

    Cutting at EOS by position matters when pad = EOS: everything after the first EOS is padding that generate
    appended once the row was done.
    """
    cut_rows, stops = [], []
    for ids in rows:
        stop = "length"
        for position, token in enumerate(ids):
            if token in eos_ids:
                ids, stop = ids[:position], "eos"
                break
        cut_rows.append(ids)
        stops.append(stop)
    return [_cut_at_stop(tokenizer, ids, text, stop, stop_strings)
            for ids, text, stop in zip(cut_rows, texts_of(tokenizer, cut_rows), stops, strict=True)]


def _cut_at_stop(tokenizer, ids: list[int], text: str, stop: str,
                 stop_strings: tuple[str, ...]) -> tuple[str, int, str]:
    """``text`` (of ``ids``) cut before its first stop string, with the token count that cut text took: the
    answer a stop string ends is counted in tokens, and the tokens spelling the stop string are not the answer's."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    if cut < 0:
        return text, len(ids), stop
    # Drop the tokens that only spell the stop string (and any padding after it): the shortest
    # prefix of ids whose text still covers the kept answer. Usually a few steps from the end.
    n = len(ids)
    while n > 0 and len(tokenizer.decode(ids[: n - 1], skip_special_tokens=True)) >= cut:
        n -= 1
    return text[:cut], n, "stop"


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every module in eval mode (no dropout), then restore each module's own flag.

    Restoring per module, not with one ``model.train(was_training)``, keeps deliberate mixes
    intact (e.g. a frozen base kept in eval while adapters train).
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def _seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the generator that sampling on ``device`` draws from, on a fork of the global RNG.

    ``model.generate`` takes no generator argument: it samples from the device's default
    generator. Forking saves and restores that state (and the CPU's), so the caller's data order
    and dropout stay exactly as they would have been without generating. Only the model's own
    CUDA device is forked: touching every visible GPU would create a CUDA context on each.
    """
    on_cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if on_cuda else 0
    with torch.random.fork_rng(devices=[index] if on_cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if on_cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
