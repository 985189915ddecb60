"""minialign.modeling.lora against PEFT (logits both ways, counts) and exact Pythia-70m numbers."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from minialign.base.errors import UserError
from minialign.modeling.adapters import load_adapter, save_adapter
from minialign.modeling.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_parameters,
    disabled,
    lora_param_table,
    lora_parameters,
    merge_lora,
    resolve_target_modules,
)

NEOX_SUFFIXES = ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
LLAMA_SUFFIXES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny_neox(seed: int = 0, hidden: int = 64) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=4 * hidden, max_position_embeddings=128)
    return GPTNeoXForCausalLM(config).float().eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).float().eval()


def logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomise_lora(model: torch.nn.Module, seed: int = 2) -> None:
    """Non-zero A and B, so an adapter that is ignored or mis-scaled changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


CASES = {
    "default": dict(r=4, alpha=8, target_modules="all-linear", use_rslora=False),
    "rslora": dict(r=4, alpha=8, target_modules="all-linear", use_rslora=True),
    "explicit": dict(r=2, alpha=5, target_modules=["query_key_value", "dense_4h_to_h"], use_rslora=False),
}


def peft_config(case: dict) -> peft.LoraConfig:
    return peft.LoraConfig(r=case["r"], lora_alpha=case["alpha"], target_modules=case["target_modules"],
                           use_rslora=case["use_rslora"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_our_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    model = apply_lora(tiny_neox(), LoRAConfig(**CASES[case]))
    randomise_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-neox")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == CASES[case]["r"]
    assert saved["base_model_name_or_path"] == "tiny-neox"
    peft_model = peft.PeftModel.from_pretrained(tiny_neox(), tmp_path / "adapter", is_trainable=True).eval()
    assert torch.allclose(logits(peft_model), logits(model), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(peft_model), logits(tiny_neox()), atol=1e-3)  # the adapter really acts
    ours = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    theirs = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs
    # Same gradients too (our forward adds the update in place; autograd must still be right).
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    for m in (model, peft_model):
        m(input_ids=ids, labels=ids).loss.backward()
    peft_grads = {n.removeprefix("base_model.model.").replace(".default.", "."): p.grad
                  for n, p in peft_model.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert our_grads.keys() == peft_grads.keys()
    for name, grad in our_grads.items():
        assert torch.allclose(grad, peft_grads[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_peft_adapter_loads_in_ours_with_same_logits(case, tmp_path):
    peft_model = peft.get_peft_model(tiny_neox(), peft_config(CASES[case])).eval()
    randomise_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_adapter(tiny_neox(), tmp_path / "peft").eval()
    assert torch.allclose(logits(model), logits(peft_model), rtol=0, atol=1e-5)
    assert model.lora_config.r == CASES[case]["r"] and model.lora_config.use_rslora == CASES[case]["use_rslora"]
    assert count_parameters(model) == peft_model.get_nb_trainable_parameters()
    # Loading into a model that already has this exact LoRA replaces its weights (the resume path).
    again = apply_lora(tiny_neox(), LoRAConfig(**CASES[case]))
    assert torch.allclose(logits(load_adapter(again, tmp_path / "peft")), logits(model), rtol=0, atol=0)


def test_zero_b_merge_keys_and_gradients():
    base = tiny_neox()
    base_keys = set(base.state_dict())
    model = copy.deepcopy(base)
    qkv = model.gpt_neox.layers[0].attention.query_key_value
    apply_lora(model, LoRAConfig(r=4))
    assert torch.equal(logits(model), logits(base))  # B = 0: exactly the base model
    keys = set(model.state_dict())
    assert base_keys <= keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys - base_keys)
    layer = model.gpt_neox.layers[0].attention.query_key_value
    assert isinstance(layer, LoRALinear) and layer.weight is qkv.weight and layer.bias is qkv.bias  # shared, not copied
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (192, 4)
    assert layer.lora_dropout is None

    randomise_lora(model)
    model(input_ids=torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert len(list(lora_parameters(model))) == 2 * 4 * 2

    unmerged = logits(model)
    merge_lora(model)
    assert torch.allclose(logits(model), unmerged, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == base_keys
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.gpt_neox.layers[0].mlp.dense_h_to_4h) is torch.nn.Linear


def test_disabled_gives_base_and_restores_even_on_error():
    base = tiny_neox()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=4))
    randomise_lora(model)
    adapted = logits(model)
    with disabled(model):
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), adapted)
    with pytest.raises(RuntimeError), disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(logits(model), adapted)


def test_pythia70m_rank_table_is_exact():
    from minialign.modeling.models import load_model

    model = load_model("pythia-70m")
    assert count_parameters(model)[1] == 70_426_624
    table = lora_param_table(model, [2, 4, 8, 16])
    assert [row["trainable"] for row in table] == [98_304, 196_608, 393_216, 786_432]
    assert [row["percent"] for row in table] == [0.14, 0.28, 0.56, 1.10]
    assert table[2]["total"] == 70_819_840
    assert count_parameters(model) == (70_426_624, 70_426_624)  # the table did not touch the model
    apply_lora(model, LoRAConfig(r=8))
    assert count_parameters(model) == (393_216, 70_819_840)


def test_table_matches_applying_lora():
    base = tiny_neox()
    targets = ["query_key_value", "dense"]
    for row in lora_param_table(base, [1, 3, 8], targets):
        model = apply_lora(copy.deepcopy(base), LoRAConfig(r=row["rank"], target_modules=targets))
        trainable, total = count_parameters(model)
        assert (row["trainable"], row["total"]) == (trainable, total)
        assert row["percent"] == round(100 * trainable / total, 2)


@pytest.mark.parametrize("build, suffixes", [(tiny_neox, NEOX_SUFFIXES), (tiny_llama, LLAMA_SUFFIXES)],
                         ids=["gpt-neox", "llama"])
def test_all_linear_matches_peft(build, suffixes):
    assert resolve_target_modules(build(), "all-linear") == suffixes
    ours = apply_lora(build(), LoRAConfig(r=4))
    assert ours.lora_targets == suffixes
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    peft_layers = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)} == peft_layers


def test_llama_roundtrip_with_peft(tmp_path):
    model = apply_lora(tiny_llama(), LoRAConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"]))
    randomise_lora(model)
    save_adapter(model, tmp_path / "a")
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    assert torch.allclose(logits(peft_model), logits(model), rtol=0, atol=1e-5)


def test_dropout_and_dtype():
    model = apply_lora(tiny_neox(), LoRAConfig(r=2, dropout=0.1))
    assert isinstance(model.gpt_neox.layers[0].mlp.dense_h_to_4h.lora_dropout, torch.nn.Dropout)
    half = apply_lora(tiny_neox().to(torch.bfloat16), LoRAConfig(r=2))
    assert all(p.dtype == torch.bfloat16 for p in lora_parameters(half))
    mixed = apply_lora(tiny_neox().to(torch.bfloat16), LoRAConfig(r=2), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in lora_parameters(mixed))
    assert logits(mixed).dtype == torch.bfloat16


@pytest.mark.parametrize("field, value", [("r", 0), ("r", -2), ("alpha", 0), ("alpha", -1.0),
                                          ("dropout", 1.0), ("dropout", -0.1), ("target_modules", [])])
def test_bad_config_values(field, value):
    with pytest.raises(UserError, match=field):
        apply_lora(tiny_neox(), LoRAConfig(**{field: value}))


def test_targets_matching_nothing_list_linear_names():
    with pytest.raises(UserError) as err:
        apply_lora(tiny_neox(), LoRAConfig(target_modules=["q_proj", "v_proj"]))
    assert all(name in str(err.value) for name in NEOX_SUFFIXES)


def test_apply_twice_is_an_error():
    model = apply_lora(tiny_neox(), LoRAConfig(r=2))
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(r=2))


def test_adapter_with_wrong_shapes(tmp_path):
    save_adapter(apply_lora(tiny_neox(hidden=32), LoRAConfig(r=4)), tmp_path / "small")
    model = tiny_neox()
    with pytest.raises(UserError) as err:
        load_adapter(model, tmp_path / "small")
    message = str(err.value)
    assert "base_model.model.gpt_neox.layers." in message and "[4, 32]" in message and "[4, 64]" in message
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # left untouched


def test_adapter_folder_problems(tmp_path):
    save_adapter(apply_lora(tiny_llama(), LoRAConfig(r=2)), tmp_path / "llama")
    with pytest.raises(UserError, match="module .model.layers.0"):  # a module the model lacks
        load_adapter(tiny_neox(), tmp_path / "llama")
    (tmp_path / "llama" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="missing adapter_model.safetensors"):
        load_adapter(tiny_llama(), tmp_path / "llama")
    with pytest.raises(UserError, match="missing adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    save_adapter(apply_lora(tiny_neox(), LoRAConfig(r=2)), tmp_path / "ia3")
    config_file = tmp_path / "ia3" / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), peft_type="IA3")))
    with pytest.raises(UserError, match="peft_type 'IA3'"):
        load_adapter(tiny_neox(), tmp_path / "ia3")


def test_other_base_model_warns_and_loads(tmp_path, capsys):
    source = apply_lora(tiny_neox(), LoRAConfig(r=2))
    randomise_lora(source)
    save_adapter(source, tmp_path / "a", base_model_name_or_path="EleutherAI/pythia-14m")
    target = tiny_neox()
    target.config._name_or_path = "my-local-model"
    load_adapter(target, tmp_path / "a")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "EleutherAI/pythia-14m" in err and "my-local-model" in err
    assert torch.equal(logits(target), logits(source))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = apply_lora(tiny_neox(), LoRAConfig(r=2))
    save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    randomise_lora(model)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("minialign.modeling.adapters.save_file", crash)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folders left behind
    monkeypatch.undo()
    save_adapter(model, tmp_path / "a")  # replacing a complete adapter works
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_smollm2_from_its_gguf_names_its_hub_id_for_peft(smollm2_gguf, tmp_path, capsys):
    """The issue: an adapter trained on `smollm2-135m-instruct` recorded that name, which PEFT cannot resolve. Now
    adapter_config.json names the hub model, minialign_base.json the GGUF file and minialign's own name, and
    minialign still recognises its base by either name (no warning), but warns for another model."""
    from minialign.config.modelnames import SMOLLM2, SMOLLM2_HUB_ID, adapter_base

    for name in (SMOLLM2, str(smollm2_gguf)):
        record = adapter_base(name)
        assert record["base_model_name_or_path"] == SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert record["gguf_file"] == str(smollm2_gguf.resolve()) and record["minialign_model"] == name
    source = apply_lora(tiny_neox(), LoRAConfig(r=2))
    randomise_lora(source)
    save_adapter(source, tmp_path / "a", base_model_name_or_path=SMOLLM2)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2_HUB_ID
    saved = json.loads((tmp_path / "a" / "minialign_base.json").read_text())
    assert (saved["minialign_model"], saved["gguf_file"]) == (SMOLLM2, str(smollm2_gguf.resolve()))
    readme = (tmp_path / "a" / "README.md").read_text()
    assert f'from_pretrained("{SMOLLM2_HUB_ID}")' in readme and f'gguf_file="{smollm2_gguf.name}"' in readme
    for name, warned in ((SMOLLM2, False), (SMOLLM2_HUB_ID, False), ("EleutherAI/pythia-14m", True)):
        target = tiny_neox()
        target.config._name_or_path = name
        load_adapter(target, tmp_path / "a")
        assert ("warning: adapter" in capsys.readouterr().err) == warned, name
        assert torch.equal(logits(target), logits(source))


@pytest.mark.parametrize(("name", "kept"), [("EleutherAI/pythia-70m", True), ("runs/x/final/model", True),
                                            ("pythia-70m", True), ("my/model.gguf", False)])
def test_other_bases_keep_their_names_or_say_why_not(name, kept):
    """A hub id or a local folder is what PEFT loads as it is; a built-in config is kept too, with a note that no hub
    model holds its random weights; any other GGUF is named by its absolute path, with how transformers reads it."""
    from pathlib import Path

    from minialign.config.modelnames import adapter_base

    record = adapter_base(name)
    assert (record["base_model_name_or_path"] == name) == kept and record["minialign_model"] == name
    if name == "pythia-70m":
        assert "random weights: no hub model holds this base" in record["note"]
    if name.endswith(".gguf"):
        gguf = Path(name).resolve()
        assert record["base_model_name_or_path"] == record["gguf_file"] == str(gguf)
        assert f"gguf_file='{gguf.name}'" in record["note"]
    if kept and name != "pythia-70m":
        assert "note" not in record and "gguf_file" not in record
