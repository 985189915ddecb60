"""Behaviour of minialign.modeling.generate on tiny GPT-NeoX models and a tokenizer trained in the test.

The tokenizer mirrors Pythia's: byte-level BPE, ``<|endoftext|>`` = id 0 is EOS, and there is no
pad token. One model is random (float64, so that padded and unpadded runs cannot flip a near-tie);
the other has hand-set weights that make greedy decoding follow a fixed chain of tokens, so the
exact text it produces is known in advance.
"""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from minialign.base.errors import UserError
from minialign.modeling.generate import generate

CORPUS = [
    "\n\nHuman: Hello world, how are you today?\n\nAssistant: I am fine, thank you for asking.",
    "\n\nHuman: What is the quick brown fox doing?\n\nAssistant: It jumps over the lazy dog.",
]
PROMPTS = [
    "The quick brown fox",
    "\n\nHuman: Hello\n\nAssistant:",
    "I",
    "\n\nHuman: What is the quick brown fox doing today?\n\nAssistant: It",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE; runs of newlines are one pre-token, so "\\n\\n" is one token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n+| ?\w+| ?[^\w\s]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    assert tok.eos_token_id == 0 and tok.pad_token_id is None
    return tok


def tiny_model(vocab_size: int, seed: int = 0) -> GPTNeoXForCausalLM:
    """A random one-layer GPT-NeoX; a wide init makes its next-token choices clear-cut."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        initializer_range=0.5,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config).double().eval()


def chain_model(vocab_size: int, chain: list[int]) -> GPTNeoXForCausalLM:
    """A model whose greedy choice after ``chain[i]`` is ``chain[i + 1]`` whatever came before.

    The layer's weights are zero, so the residual stream carries the current token's embedding
    unchanged: a one-hot in the dimension reserved for that token. The output matrix then maps
    dimension i to token chain[i + 1]. Tokens outside the chain embed to zero, score 0 everywhere
    and so produce id 0 (EOS), as does the last token of the chain.
    """
    assert len(set(chain)) == len(chain), "a token may appear once, or its successor is ambiguous"
    model = tiny_model(vocab_size)
    with torch.no_grad():
        for param in model.gpt_neox.layers.parameters():
            param.zero_()
        model.gpt_neox.embed_in.weight.zero_()
        model.lm_head.weight.zero_()
        for dim, (token, successor) in enumerate(zip(chain, chain[1:] + [0], strict=True)):
            model.gpt_neox.embed_in.weight[token, dim] = 10.0
            model.lm_head.weight[successor, dim] = 10.0
    return model


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_sampling_is_reproducible_for_a_seed_and_leaves_global_rng_alone(tokenizer):
    model = tiny_model(len(tokenizer))
    kwargs = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 12, "stop_strings": ()}
    state = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, seed=1, **kwargs)
    assert torch.equal(torch.get_rng_state(), state), "generate must not move the global RNG"
    torch.manual_seed(1234)  # a different global state must not matter either
    assert generate(model, tokenizer, PROMPTS, seed=1, **kwargs) == first
    others = [generate(model, tokenizer, PROMPTS, seed=s, **kwargs) for s in (2, 3)]
    assert any(other != first for other in others)
    assert all(isinstance(text, str) for text in first)


def test_completion_is_cut_before_the_next_human_turn(tokenizer):
    prompt = "\n\nHuman: What is the quick brown fox doing?\n\nAssistant: The"
    continuation = ids(tokenizer, " Hello world\n\nHuman: are")
    chain = [ids(tokenizer, prompt)[-1]] + continuation
    model = chain_model(len(tokenizer), chain)

    # Without stop strings the chain runs on to its end, where the model emits EOS.
    full = generate(model, tokenizer, [prompt], max_new_tokens=30, stop_strings=())
    assert full == [" Hello world\n\nHuman: are"]

    # With the default stop string, the text ends before "\n\nHuman:" and decoding stops there
    # rather than running for all max_new_tokens.
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    assert generate(model, tokenizer, [prompt], max_new_tokens=30) == [" Hello world"]
    assert len(calls) == len(continuation) - 1  # " are" is never produced
    assert generate(model, tokenizer, [prompt], stop_strings="\n\nHuman:") == [" Hello world"]


def test_eos_ends_a_completion_and_comes_from_the_tokenizer(tokenizer):
    prompt = "\n\nHuman: Hello\n\nAssistant:"
    model = chain_model(len(tokenizer), [ids(tokenizer, prompt)[-1]] + ids(tokenizer, " I am fine"))
    assert model.generation_config.eos_token_id != 0  # the model's own config names another id
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    assert generate(model, tokenizer, [prompt, prompt], max_new_tokens=20) == [" I am fine"] * 2
    assert len(calls) == 4  # " I", " am", " fine", EOS: decoding stops at the tokenizer's EOS
    # A caller-chosen EOS wins: stopping at the token for " am" leaves " I".
    stop_id = ids(tokenizer, " am")[0]
    assert generate(model, tokenizer, [prompt], eos_token_id=stop_id) == [" I"]


def test_details_count_tokens_and_say_how_each_answer_ended(tokenizer):
    eos_prompt = "\n\nHuman: Hello\n\nAssistant:"
    stop_prompt = "\n\nHuman: What is the quick brown fox doing?\n\nAssistant: The"
    fine, hello = ids(tokenizer, " I am fine"), ids(tokenizer, " Hello world\n\nHuman: are")
    model = chain_model(len(tokenizer), [ids(tokenizer, stop_prompt)[-1], *hello])
    eos_model = chain_model(len(tokenizer), [ids(tokenizer, eos_prompt)[-1], *fine])
    [done] = generate(eos_model, tokenizer, [eos_prompt], max_new_tokens=20, details=True)
    assert (done.text, done.n_tokens, done.finished, done.stop) == (" I am fine", len(fine), True, "eos")
    [cut] = generate(model, tokenizer, [stop_prompt], max_new_tokens=30, details=True)
    assert (cut.text, cut.stop, cut.finished) == (" Hello world", "stop", True)
    assert cut.n_tokens == len(ids(tokenizer, " Hello world"))  # the stop string's tokens are not counted
    [short] = generate(eos_model, tokenizer, [eos_prompt], max_new_tokens=2, details=True)
    assert (short.text, short.n_tokens, short.finished, short.stop) == (" I am", 2, False, "length")


def test_several_samples_per_prompt_in_prompt_order(tokenizer):
    model = tiny_model(len(tokenizer), seed=3)
    kwargs = {"do_sample": True, "temperature": 1.5, "max_new_tokens": 6, "stop_strings": (), "seed": 4}
    out = generate(model, tokenizer, PROMPTS, num_samples=3, details=True, batch_size=5, **kwargs)
    assert [(c.prompt, c.sample) for c in out] == [(i, j) for i in range(len(PROMPTS)) for j in range(3)]
    assert len({c.text for c in out if c.prompt == 0}) > 1, "samples of one prompt should differ"
    greedy = generate(model, tokenizer, PROMPTS, num_samples=2, max_new_tokens=6)
    assert greedy[0::2] == greedy[1::2] == generate(model, tokenizer, PROMPTS, max_new_tokens=6)


def test_left_padded_batches_match_one_by_one_generation(tokenizer):
    model = tiny_model(len(tokenizer), seed=3)
    lengths = {len(ids(tokenizer, p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS), "prompts must differ in length to exercise padding"
    one_by_one = [generate(model, tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS]
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3)
    assert batched == one_by_one
    assert len({len(text) for text in one_by_one}) > 1 or len(set(one_by_one)) > 1
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id is None  # untouched


def test_train_and_eval_flags_are_restored(tokenizer):
    model = tiny_model(len(tokenizer)).train()
    model.gpt_neox.embed_in.eval()  # a deliberate mix must survive too
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    generate(model, tokenizer, PROMPTS[:2], max_new_tokens=3)
    assert seen and not any(seen), "generation must run in eval mode (no dropout)"
    assert {name: m.training for name, m in model.named_modules()} == before

    model.eval()
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert not model.training


def test_empty_inputs(tokenizer):
    model = tiny_model(len(tokenizer))
    assert generate(model, tokenizer, []) == []
    with pytest.raises(UserError, match="non-empty string"):
        generate(model, tokenizer, ["Hello", ""])
    with pytest.raises(UserError, match="temperature"):
        generate(model, tokenizer, ["Hello"], do_sample=True, temperature=0.0)


def test_real_gpt_neox_tokenizer_without_pad_token(shared_dir):
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(shared_dir / "tokenizers/gpt-neox-20b/tokenizer.json"),
        eos_token="<|endoftext|>",
    )
    assert tok.eos_token_id == 0 and tok.pad_token_id is None
    model = tiny_model(len(tok))
    out = generate(model, tok, ["\n\nHuman: Hi\n\nAssistant:", "Hello there, my friend"], max_new_tokens=5)
    assert len(out) == 2 and all("<|endoftext|>" not in text for text in out)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_generate_cli_chat_template(tmp_path, capsys):
    """The issue: `generate` had no --chat-template, so an adapter trained with it could only be prompted raw or
    --hh. Each prompt becomes one user message (an HH dialogue: its turns) in the tokenizer's template, the text
    training's to_chat_format gives, and the answers are plain generation's on those texts; a tokenizer without a
    template exits 2."""
    from minialign import cli
    from minialign.data.chat import to_chat_format
    from minialign.data.sources import PreferencePair
    from minialign.modeling.models import load_model, load_tokenizer

    tok = load_tokenizer("demo")
    tok.chat_template = CHATML
    tok.save_pretrained(str(tmp_path / "tok"))
    argv = ["generate", "--model", "tiny", "--tokenizer", str(tmp_path / "tok"), "--max-new-tokens", "6",
            "--chat-template", "--prompt", "What colour is the sky?", "--prompt", "Hi"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    expected = ["<|im_start|>user\nWhat colour is the sky?<|endoftext|>\n<|im_start|>assistant\n",
                "<|im_start|>user\nHi<|endoftext|>\n<|im_start|>assistant\n"]
    assert to_chat_format([PreferencePair("\n\nHuman: Hi\n\nAssistant:", "a", "b")], tok)[0].prompt == expected[1]
    answers = generate(load_model("tiny"), load_tokenizer(str(tmp_path / "tok")), expected, max_new_tokens=6)
    assert printed == "".join(f"PROMPT: {p.strip()}\nMODEL: {a.strip()}\n\n" for p, a in zip(expected, answers))
    assert cli.main([*argv, "--hh"]) == 0  # an HH-wrapped prompt is the same user turn
    assert capsys.readouterr().out == printed
    assert cli.main(["generate", "--model", "tiny", "--tokenizer", "demo", "--chat-template", "--prompt", "Hi"]) == 2
    assert "has no chat template" in capsys.readouterr().err
