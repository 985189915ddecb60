"""Model/tokenizer loading and the `lora-params` command (built-in configs, GGUF, hub errors)."""

import json

import pytest
import torch

from minialign import cli
from minialign.base.errors import UserError
from minialign.modeling import lora
from minialign.modeling.models import BUILTIN_CONFIGS, load_model, load_tokenizer


def test_pythia_70m_exact_size_and_seeded():
    a, b = load_model("pythia-70m", seed=1), load_model("pythia-70m", seed=1)
    assert sum(p.numel() for p in a.parameters()) == 70_426_624
    assert torch.equal(a.get_output_embeddings().weight, b.get_output_embeddings().weight)
    assert not torch.equal(a.get_output_embeddings().weight, load_model("pythia-70m", seed=2).get_output_embeddings().weight)


def test_lora_params_cli_exact_table(capsys):
    assert cli.main(["lora-params", "--model", "pythia-70m", "--ranks", "2", "4", "8", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["trainable"] for r in rows] == [98_304, 196_608, 393_216, 786_432]
    assert [r["percent"] for r in rows] == [0.14, 0.28, 0.56, 1.10]
    assert rows[2]["total"] == 70_819_840
    assert cli.main(["lora-params", "--model", "pythia-70m"]) == 0
    assert "393,216" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["lora-params", "--ranks", "0"], "positive integer"),
    (["lora-params", "--model", "no-such-model-here"], "built-in name"),
    (["lora-params", "--targets", "nothing_matches"], "query_key_value"),
])
def test_lora_params_bad_input_exit_2(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and needle in err and "Traceback" not in err


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="built-in name"):
        load_model("EleutherAI/definitely-not-cached-70m")


def test_tokenizer_json_and_demo(shared_dir):
    tok = load_tokenizer(str(shared_dir / "tokenizers/gpt-neox-20b/tokenizer.json"))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 0
    assert len(tok) <= BUILTIN_CONFIGS["pythia-70m"]["vocab_size"]
    demo = load_tokenizer("demo")
    assert demo.eos_token_id == 0 and len(demo) <= BUILTIN_CONFIGS["tiny"]["vocab_size"]


def test_smollm2_loads_generates_and_lora_matches_peft(smollm2_gguf):
    import peft

    model = load_model("smollm2-135m-instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None and not model.is_quantized
    tok = load_tokenizer("smollm2-135m-instruct")
    assert tok.eos_token_id == model.config.eos_token_id == 2  # the GGUF tokenizer alone would say 1
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                  add_generation_prompt=True)
    ids = tok(chat, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear")).unload()
    ours = lora.apply_lora(model, lora.LoRAConfig(r=8))
    assert lora.count_parameters(ours)[0] == n_peft
    assert sorted(ours.lora_targets) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_llama_builtins():
    """llama-1b is Llama-3.2-1B's body on SmolLM2's vocabulary (counted on the meta device: no 4 GB allocation)."""
    from transformers import AutoModelForCausalLM

    from minialign.modeling.models import builtin_config, default_tokenizer

    config = builtin_config("llama-1b")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 1_073_809_408
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (32, 8, True)
    tiny = load_model("tiny-llama")
    assert tiny.config.num_key_value_heads * 2 == tiny.config.num_attention_heads
    assert default_tokenizer("llama-1b") == "smollm2-135m-instruct" and default_tokenizer("tiny-llama") == "demo"


@pytest.mark.parametrize("name", ["runs/nope", "no-such-model"])
def test_a_missing_model_says_so_first_and_lists_what_was_tried(name, tmp_path, monkeypatch, capsys):
    """The issue: `eval --policy runs/nope` and `--model no-such-model` said "Could not load tokenizer ...", naming
    the wrong thing; now: not a folder or file here, not a built-in name, not a cached hub id (offline)."""
    from minialign.config.modelnames import builtin_names

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_tokenizer):
        with pytest.raises(UserError) as exc:
            load(name)
        message = str(exc.value)
        assert message.startswith(f"'{name}' was not found: there is no folder or file {name} here "
                                  f"({tmp_path / name}), it is not a built-in name ({', '.join(builtin_names())})")
        assert "not in the local Hugging Face cache, and the hub cannot be reached (offline)" in message
        assert "Could not load" not in message and "tokenizer" not in message
    for argv in (["eval", "--policy", name], ["sft", "--model", name, "--dataset", "demo", "--out", "run"]):
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.startswith(f"error: '{name}' was not found: there is no folder or file")
    assert list(tmp_path.iterdir()) == []


def test_the_hub_saying_no_such_repository_is_not_found_too():
    from huggingface_hub.errors import RepositoryNotFoundError

    from minialign.modeling.models import _repo_missing, not_found

    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(missing, "404 Client Error: Repository Not Found")
    try:
        try:
            raise missing
        except RepositoryNotFoundError as inner:  # how transformers reports it
            raise OSError("x is not a local folder and is not a valid model identifier") from inner
    except OSError as outer:
        assert _repo_missing(outer) and not _repo_missing(OSError("x has no config.json"))
    assert "the hub has no model of that id" in not_found("org/x", online=True)
