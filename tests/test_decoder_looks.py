"""The static decoder's looks at its rows, read a chunk of steps late (``decode_state.Look``), and the batch decode of
answers' texts (``generate.texts_of``): the same answers as looking at once and decoding row by row."""

import copy
import random

import pytest
import torch

from minialign.modeling.decode_state import Look, allocate_state
from minialign.modeling.decoder import StaticDecoder
from minialign.modeling.generate import generate, texts_of
from minialign.modeling.models import load_tokenizer
from minialign.modeling.sampling import Sampling
from tests.test_decoder import NEW, PROMPTS, eos_for, llama, many_prompts


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("demo")


def test_a_look_holds_the_state_as_it_was_when_taken():
    s = allocate_state(4, 8, 5, (1, 4, 1, 8, 2), torch.float32, torch.ones(8, 2), torch.zeros(8, 2))
    s.done[:] = torch.tensor([False, True, False, True])
    s.row_id[:] = torch.tensor([2, 0, 1, 4])
    s.out[:3, :3] = torch.arange(9).view(3, 3)
    look = Look(s, bucket=3, n=3, steps=2, tokens=True)
    s.done[:] = True  # the steps after the look, and what the host decides, change the state...
    s.out.zero_()
    done, rows, tokens = look.read()  # ...not the look
    assert done == [False, True, False] and rows == [2, 0, 1]
    assert tokens == [[0, 1], [3, 4], [6, 7]]
    assert Look(s, bucket=2, n=3, steps=2, tokens=False).read()[2] is None


@pytest.mark.parametrize("sync_every,late", [(1, True), (2, True), (3, True), (1, False)])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(True, 0.8, 20, 0.9)])
def test_late_looks_retire_rows_without_changing_an_answer(tok, sync_every, late, sampling):
    # Rows that finish after a look are compacted as if live: they must stay finished (pads only) in the smaller bucket.
    model = llama()
    prompts = many_prompts(10)
    eos = eos_for(model, tok, prompts, sampling)
    encoded = tok(prompts, add_special_tokens=False)["input_ids"]

    def run(decoder):
        return decoder.decode(encoded, max_new_tokens=NEW, eos_ids=[eos], pad_id=0, sampling=sampling,
                              generator=torch.Generator().manual_seed(3))

    retiring = StaticDecoder(model, sync_every=sync_every, min_bucket=1, late_looks=late)
    kept = run(StaticDecoder(model, retire=False, sync_every=NEW))
    assert run(retiring) == kept
    assert retiring.compactions >= (1 if sync_every < 3 else 0)  # 12 steps leave three chunks a look of 3 to act on
    for ids in kept:  # some rows end early, and nothing but pads follows an EOS
        if eos in ids:
            assert set(ids[ids.index(eos) + 1:]) <= {0}
    assert any(eos in ids[:NEW - 2] for ids in kept) and any(eos not in ids for ids in kept)


@pytest.mark.parametrize("sync_every", [1, 2, 4])
def test_rows_that_end_between_a_look_and_the_compaction_move_and_stay_ended(tok, monkeypatch, sync_every):
    model = llama()
    encoded = tok(many_prompts(20), add_special_tokens=False)["input_ids"]
    new = 24
    free = StaticDecoder(model, retire=False).decode(encoded, max_new_tokens=new, eos_ids=[-1], pad_id=0)
    eos_ids = sorted({free[i][2 + i % 18] for i in range(0, 20, 2)})  # rows end at staggered steps
    kept = StaticDecoder(model, retire=False, sync_every=new).decode(encoded, max_new_tokens=new, eos_ids=eos_ids,
                                                                     pad_id=0)
    moved_ended, compact = [], StaticDecoder._compact

    def spy(self, live, bucket, used):
        moved_ended.append(sum(self.state.done[live].tolist()))  # slots the late look counted live, already ended
        return compact(self, live, bucket, used)

    monkeypatch.setattr(StaticDecoder, "_compact", spy)
    decoder = StaticDecoder(model, sync_every=sync_every, min_bucket=1)
    got = decoder.decode(encoded, max_new_tokens=new, eos_ids=eos_ids, pad_id=0)
    assert [g[: len(k)] for g, k in zip(got, kept)] == kept and all(set(g[len(k):]) <= {0} for g, k in zip(got, kept))
    assert sum(moved_ended) >= 1  # the case this test is for happened


def test_when_every_row_has_ended_a_batch_stops_within_one_chunk(tok):
    model = llama()
    encoded = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    free = StaticDecoder(model).decode(encoded, max_new_tokens=NEW, eos_ids=[-1], pad_id=0)
    eos = free[0][2]  # row 0's third token: every row that writes it ends there; the others end at the first token
    ends = [ids.index(eos) if eos in ids else 0 for ids in free]
    eos_ids = [eos] + [ids[0] for ids, end in zip(free, ends) if eos not in ids]
    long_enough = 40
    decoder = StaticDecoder(model, sync_every=2)
    rows = decoder.decode(encoded, max_new_tokens=long_enough, eos_ids=eos_ids, pad_id=0)
    for ids, want in zip(rows, free):
        end = next(i for i, t in enumerate(ids) if t in eos_ids)
        assert ids[: end + 1] == want[: end + 1] and set(ids[end + 1:]) <= {0}
    assert max(ends) + 1 <= decoder.last_steps <= max(ends) + 1 + 2 * decoder.sync_every < long_enough


def test_stop_strings_found_a_chunk_late_still_cut_every_answer_where_transformers_does(tok):
    model = llama()
    plain = generate(model, tok, PROMPTS, max_new_tokens=NEW, stop_strings=(), decoder="hf")
    common = {"max_new_tokens": NEW, "details": True, "stop_strings": (plain[0][6:9], plain[2][4:7]), "batch_size": 8}
    reference = generate(model, tok, PROMPTS, decoder="hf", **common)
    for sync_every, late in ((1, True), (3, True), (1, False)):
        decoder = StaticDecoder(model, sync_every=sync_every, late_looks=late)
        assert generate(model, tok, PROMPTS, decoder=decoder, **common) == reference
    assert sum(c.stop == "stop" for c in reference) >= 2


def random_rows(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    special = list(tokenizer.all_special_ids) or [0]
    vocab = len(tokenizer)
    return [[rng.choice(special) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
            for _ in range(n)]


class SpyBackend:
    """The Rust tokenizer, counting the batch decodes asked of it."""

    def __init__(self, backend):
        self.backend, self.batches = backend, 0

    def decode_batch(self, rows, **kwargs):
        self.batches += 1
        return self.backend.decode_batch(rows, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def spied(monkeypatch, tokenizer) -> SpyBackend:
    spy = SpyBackend(tokenizer.backend_tokenizer)
    monkeypatch.setattr(type(tokenizer), "backend_tokenizer", property(lambda self: spy))
    return spy


def test_batch_decoded_texts_are_transformers_row_by_row(tok, shared_dir, monkeypatch):
    from transformers import AutoTokenizer

    neox = AutoTokenizer.from_pretrained(str(shared_dir / "tokenizers" / "gpt-neox-20b"))
    for tokenizer in (tok, neox):
        rows = random_rows(tokenizer, 64) + [tokenizer("Hello there, how are you?")["input_ids"], []]
        want = [tokenizer.decode(ids, skip_special_tokens=True) for ids in rows]
        assert any("\ufffd" in t for t in want)  # cut multi-byte characters decode as transformers decodes them
        with monkeypatch.context() as m:
            spy = spied(m, tokenizer)
            assert texts_of(tokenizer, rows) == want
            assert spy.batches == 1  # the Rust tokenizer decoded the batch


def test_a_tokenizer_that_cleans_up_spaces_is_decoded_by_transformers(tok, monkeypatch):
    cleaning = copy.deepcopy(tok)
    cleaning.clean_up_tokenization_spaces = True
    cleaning.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True  # transformers >= 5.2x
    rows = [cleaning("a , b . c ?")["input_ids"]] + random_rows(cleaning, 8)
    want = [cleaning.decode(ids, skip_special_tokens=True) for ids in rows]
    spy = spied(monkeypatch, cleaning)
    assert texts_of(cleaning, rows) == want and spy.batches == 0
    assert want[0] == "a, b. c?"  # the clean-up the Rust tokenizer would have skipped


def test_a_patched_decode_is_respected(tok, monkeypatch):
    patched = copy.deepcopy(tok)
    patched.decode = lambda ids, skip_special_tokens=False: f"<{len(ids)}>"
    spy = spied(monkeypatch, patched)
    assert texts_of(patched, [[1, 2], [3]]) == ["<2>", "<1>"] and spy.batches == 0
