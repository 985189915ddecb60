"""The converted-model cache (minialign.modeling.cache): the real SmolLM2 GGUF converted once, then read back; the
failure cases (no cache, truncated, partial, corrupt, concurrent entries) on a stand-in conversion, so the slow
GGUF conversion runs once for the whole file."""

import json
import shutil

import pytest
import torch

from minialign.modeling import cache, models
from minialign.modeling.models import SMOLLM2, load_model, load_tokenizer

TEXTS = ["Hello there, how are you?", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>"]


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory):
    """SmolLM2 converted on its first load, into a cache folder of this module."""
    folder = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cache.ENV, str(folder))
        model, tok = load_model(SMOLLM2), load_tokenizer(SMOLLM2)
        yield folder, model, tok
    shutil.rmtree(folder, ignore_errors=True)


def test_first_load_writes_entry_keyed_by_file_hash(converted, smollm2_gguf):
    folder, model, _ = converted
    import hashlib

    digest = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    for part in ("model", "tokenizer"):
        entry = folder / "gguf" / digest / part
        manifest = json.loads((entry / cache.MANIFEST).read_text())
        assert manifest["sha256"] == digest and manifest["files"]
        assert cache.complete(entry)
    assert not [p for p in (folder / "gguf" / digest).iterdir() if p.name.startswith(".")]  # no temporary folders
    config = json.loads((folder / "gguf" / digest / "model" / "config.json").read_text())
    assert "quantization_config" not in config and config["eos_token_id"] == 2
    assert model.config._name_or_path == SMOLLM2 and model.dtype == torch.float32


def test_second_load_reads_the_cache_with_identical_weights_and_tokenizer(converted, monkeypatch, capsys):
    folder, model, tok = converted
    monkeypatch.setenv(cache.ENV, str(folder))

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached entry should have been read, not the GGUF converted again")

    monkeypatch.setattr(models, "_convert_gguf_model", no_conversion)
    again = load_model(SMOLLM2)
    tok2 = load_tokenizer(SMOLLM2)
    err = capsys.readouterr().err
    assert "model of SmolLM2-135M-Instruct.Q4_1.gguf read from the cache" in err
    assert "tokenizer of SmolLM2-135M-Instruct.Q4_1.gguf read from the cache" in err
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.get_output_embeddings().weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()  # tied
    assert again.config._name_or_path == SMOLLM2 and not getattr(again.config, "quantization_config", None)
    assert getattr(again, "hf_quantizer", None) is None
    assert (tok2.eos_token, tok2.eos_token_id, tok2.pad_token_id) == (tok.eos_token, tok.eos_token_id, tok.pad_token_id)
    assert tok2.eos_token == "<|im_end|>" and tok2.eos_token_id == model.config.eos_token_id
    assert [tok2(t).input_ids for t in TEXTS] == [tok(t).input_ids for t in TEXTS]
    assert tok2.chat_template == tok.chat_template and len(tok2) == len(tok)


# ----------------------------------------------------------------------------- failure cases, on a stand-in


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A fake .gguf whose 'conversion' builds the tiny built-in model, counting conversions."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def convert(path, dtype):
        calls.append(path)
        return models.load_model("tiny", seed=len(calls))

    monkeypatch.setattr(models, "_convert_gguf_model", convert)
    monkeypatch.setattr(models, "_require_gguf", lambda: None)
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    return gguf, calls, tmp_path / "cache"


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_no_cache_converts_in_memory_and_writes_nothing(stand_in):
    gguf, calls, folder = stand_in
    load_model(str(gguf), cache=False)
    load_model(str(gguf), cache=False)
    assert len(calls) == 2 and not folder.exists()
    load_model(str(gguf))  # the same load with the cache on does write it
    assert cache.complete(cache.gguf_entry(gguf, "model"))


@pytest.mark.parametrize("damage", ["truncated", "no manifest", "corrupt bytes"])
def test_damaged_entry_is_detected_and_rebuilt(stand_in, damage):
    gguf, calls, _ = stand_in
    load_model(str(gguf))
    entry = cache.gguf_entry(gguf, "model")
    weights = entry / "model.safetensors"
    if damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "no manifest":  # an entry some process was killed writing
        (entry / cache.MANIFEST).unlink()
    else:  # same size, unreadable: the loader fails and the entry is replaced
        weights.write_bytes(b"\0" * weights.stat().st_size)
    assert damage == "corrupt bytes" or not cache.complete(entry)
    rebuilt = load_model(str(gguf))
    assert len(calls) == 2 and cache.complete(entry)
    reread = load_model(str(gguf))
    assert len(calls) == 2  # read from the rebuilt entry
    assert all(torch.equal(a, b) for a, b in zip(_weights(rebuilt).values(), _weights(reread).values()))
    assert [p.name for p in entry.parent.iterdir()] == ["model"]  # nothing half-written or set aside is left


def test_a_finished_entry_of_another_process_is_kept(stand_in, tmp_path):
    gguf, _, _ = stand_in
    entry = cache.gguf_entry(gguf, "model")

    def write(text):
        return lambda folder: (folder / "a.txt").write_text(text)

    cache._publish(entry, write("first"), gguf, replace=False)
    cache._publish(entry, write("second"), gguf, replace=False)  # lost the race: no error, the first one stays
    assert (entry / "a.txt").read_text() == "first" and cache.complete(entry)
    assert [p.name for p in entry.parent.iterdir()] == ["model"]


def test_cache_root_follows_the_documented_order(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "minialign"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "minialign"
    monkeypatch.setenv(cache.ENV, str(tmp_path / "mine"))
    assert cache.cache_root() == tmp_path / "mine"


def test_sft_threads_no_cache_through_to_the_loader(stand_in, tmp_path):
    from minialign.cli import main

    gguf, calls, folder = stand_in
    common = ["sft", "--demo", "--model", str(gguf), "--tokenizer", "demo", "--max-steps", "1", "--limit", "16"]
    assert main([*common, "--no-cache", "--out", str(tmp_path / "a")]) == 0
    assert len(calls) == 1 and not folder.exists()
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert len(calls) == 2 and cache.complete(cache.gguf_entry(gguf, "model"))
