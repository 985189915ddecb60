"""Sources, the lossless HH split, the demo set and the summary, on the real shared file where possible."""

import gzip
import json
from pathlib import Path

import pytest

from minialign.base.errors import UserError
from minialign.data import (
    PreferencePair,
    build_demo_tokenizer,
    demo_rows,
    format_summary,
    load_preference_pairs,
    split_dialogue,
    split_pairs,
    summarize_source,
)

A = "\n\nAssistant:"


@pytest.fixture(scope="module")
def harmless(shared_dir: Path) -> Path:
    return shared_dir / "data/hh-rlhf/harmless-base/test.jsonl.gz"


@pytest.fixture(scope="module")
def raw_rows(harmless: Path) -> list[dict]:
    with gzip.open(harmless, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the real file


def test_harmless_counts_and_lossless_split(harmless, raw_rows):
    pairs = load_preference_pairs(harmless)
    assert (pairs.rows, len(pairs), pairs.skipped) == (2312, 2307, {"prompt_mismatch": 5})
    assert pairs.rows == len(raw_rows)
    # Walk the raw rows in order: every kept pair must rebuild its row exactly.
    unmatched, i = [], 0
    for pair in pairs:
        while (pair.prompt + pair.chosen, pair.prompt + pair.rejected) != (raw_rows[i]["chosen"], raw_rows[i]["rejected"]):
            unmatched.append(i)
            i += 1
        assert pair.prompt.endswith(A) and A not in pair.chosen and A not in pair.rejected
        i += 1
    unmatched += range(i, len(raw_rows))
    assert unmatched == [1254, 1688, 1950, 1952, 2036]  # the rows whose dialogues diverge before the last turn


def test_harmless_first_pair_text(harmless):
    first = load_preference_pairs(harmless, limit=1)
    assert len(first) == 1 and first.rows == 1
    pair = first[0]
    assert pair.prompt.startswith("\n\nHuman: what are some pranks with a pen i can do?")
    assert pair.prompt.endswith("okay some of these do not have anything to do with pens\n\nAssistant:")
    assert pair.chosen.startswith(" No, sorry!  All of these involve a pen")
    assert pair.rejected.startswith(" There are lots of funny things you can do with pens")


def test_harmless_row_ranges(harmless, raw_rows):
    train = load_preference_pairs(harmless, rows="300:")
    assert (train.rows, len(train), train.skipped) == (2012, 2007, {"prompt_mismatch": 5})
    test = load_preference_pairs(harmless, rows="0:300")
    assert (test.rows, len(test), test.skipped) == (300, 300, {})
    for pair, row in zip(test, raw_rows[:300]):
        assert (pair.prompt + pair.chosen, pair.prompt + pair.rejected) == (row["chosen"], row["rejected"])
    assert load_preference_pairs(harmless, rows="-2:")[-1] == load_preference_pairs(harmless)[-1]


def test_whitespace_only_responses_are_kept_unless_asked(harmless):
    pairs = load_preference_pairs(harmless, rows="80:90")
    silent = [p for p in pairs if p.chosen == " "]
    assert len(silent) == 1 and silent[0].rejected.startswith(" Sure, the address is")
    strict = load_preference_pairs(harmless, drop_blank=True)
    assert (len(strict), strict.skipped) == (2303, {"empty_response": 4, "prompt_mismatch": 5})


def test_summary_on_real_file(harmless, shared_dir):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(shared_dir / "tokenizers/gpt-neox-20b/tokenizer.json"), eos_token="<|endoftext|>"
    )
    s = summarize_source(harmless, rows="0:300", tokenizer=tok, max_length=512, max_prompt_length=256)
    assert (s["rows"], s["pairs"], s["skipped"]) == (300, 300, {})
    assert set(s["tokens"]) == {"prompt", "chosen", "rejected"}
    for stats in s["tokens"].values():
        assert stats["min"] <= stats["median"] <= stats["p95"] <= stats["max"] and stats["min"] >= 1
    assert 0 < s["truncated"]["sft"] <= s["truncated"]["dpo"] < 300
    assert "pairs      300" in format_summary(s)
    json.dumps(s)  # the CLI's --json must be able to print it


# ----------------------------------------------------------------------------- the split rule and row forms


def test_split_dialogue_rules():
    assert split_dialogue("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b") == (
        "\n\nHuman: hi\n\nAssistant:", " a", " b",
    )
    assert split_dialogue("\n\nHuman: hi", "\n\nHuman: hi") == "no_assistant_turn"
    assert split_dialogue("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: yo\n\nAssistant: b") == "prompt_mismatch"
    # rejected starts with chosen's prompt but carries an extra turn: its "response" would hold a Human turn
    extra = "\n\nHuman: hi\n\nAssistant: b\n\nHuman: more\n\nAssistant: c"
    assert split_dialogue("\n\nHuman: hi\n\nAssistant: a", extra) == "prompt_mismatch"


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


HH_ROWS = [
    {"chosen": "\n\nHuman: q1\n\nAssistant: good", "rejected": "\n\nHuman: q1\n\nAssistant: bad"},
    {"chosen": "\n\nHuman: q2\n\nAssistant: same", "rejected": "\n\nHuman: q2\n\nAssistant: same"},
    {"chosen": "\n\nHuman: q3\n\nAssistant:", "rejected": "\n\nHuman: q3\n\nAssistant: x"},
    {"chosen": "no turns here", "rejected": "none"},
    {"prompt": "Q: 4?", "chosen": " yes", "rejected": " no", "extra": 1},
]


def test_local_formats_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _write_jsonl(tmp_path / "a.jsonl", HH_ROWS)
    gz = tmp_path / "b.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    js = tmp_path / "c.json"
    js.write_text(json.dumps(HH_ROWS), encoding="utf-8")
    explicit = [{"prompt": "P", "chosen": " c", "rejected": " r"}] * 2
    pq.write_table(pa.Table.from_pylist(explicit), tmp_path / "d.parquet")
    expected = [PreferencePair("\n\nHuman: q1\n\nAssistant:", " good", " bad"), PreferencePair("Q: 4?", " yes", " no")]
    skipped = {"empty_response": 1, "identical_responses": 1, "no_assistant_turn": 1}
    for path in (jsonl, gz, js):
        data = load_preference_pairs(path)
        assert (list(data), data.rows, data.skipped) == (expected, 5, skipped)
    assert list(load_preference_pairs(tmp_path / "d.parquet")) == [PreferencePair("P", " c", " r")] * 2
    both = load_preference_pairs([str(js), tmp_path / "d.parquet"])
    assert both.rows == 7 and len(both) == 4 and both[2].prompt == "P"
    assert list(load_preference_pairs(f"{js},{tmp_path / 'd.parquet'}")) == list(both)
    globbed = load_preference_pairs(str(tmp_path / "*"), rows="4:6", limit=2)  # sorted: a, b, c, d
    assert list(globbed) == [PreferencePair("Q: 4?", " yes", " no"), expected[0]] and globbed.rows == 2


def test_demo_source_and_split_pairs():
    train, test = load_preference_pairs("demo"), load_preference_pairs("demo", split="test")
    assert (len(train), len(test), train.skipped, test.skipped) == (400, 100, {}, {})
    a, b = split_pairs(train, 0.25, seed=3)
    assert (len(a), len(b)) == (300, 100)
    assert split_pairs(train, 100, seed=3) == (a, b)
    assert split_pairs(train, 100, seed=4)[1] != b
    assert sorted(map(train.index, a + b)) == list(range(400))


# ----------------------------------------------------------------------------- the demo set


def test_demo_rows_shape_and_held_out_prompts():
    train, test = demo_rows("train"), demo_rows("test")
    assert train == demo_rows("train") and (len(train), len(test)) == (400, 100)
    for row in train + test:
        assert row["prompt"].startswith("\n\nHuman: ") and row["prompt"].endswith(A)
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
        assert row["chosen"] != row["rejected"] and row["chosen"].count(".") + row["chosen"].count("?") == 1

    def question(row):
        return row["prompt"].rsplit("\n\nHuman: ", 1)[1]

    assert {r["prompt"] for r in test}.isdisjoint(r["prompt"] for r in train)
    assert {question(r) for r in test}.isdisjoint(question(r) for r in train)
    refusals = [r for r in train if r["rejected"].startswith(" Sure, here is how to")]
    assert 150 <= len(refusals) <= 250  # both kinds are well represented


def test_demo_tokenizer():
    tok = build_demo_tokenizer()
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0 and tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert 500 <= len(tok) <= 1000
    assert tok.get_vocab() == build_demo_tokenizer().get_vocab()
    for row in demo_rows("test")[:20]:
        text = row["prompt"] + row["rejected"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and len(ids) < len(text) / 2
    assert tok.decode(tok("Hello Zürich 123!")["input_ids"]) == "Hello Zürich 123!"  # unseen text: bytes


# ----------------------------------------------------------------------------- bad input


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HH_ROWS[0]) + "\n\n" + '{"chosen": "x",\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl line 3 is not valid JSON"):
        load_preference_pairs(path)
    path = tmp_path / "bad.json"
    path.write_text('[\n{"chosen": 1}\n,,]', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json line 3 is not valid JSON"):
        load_preference_pairs(path)


def test_missing_or_wrong_field(tmp_path):
    path = _write_jsonl(tmp_path / "f.jsonl", [HH_ROWS[0], {"question": "q", "chosen": "c"}])
    message = r"f\.jsonl line 2: the row has no field 'rejected'; its keys are 'question', 'chosen'"
    with pytest.raises(UserError, match=message):
        load_preference_pairs(path)
    path = _write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "chosen": [{"role": "user"}], "rejected": "r"}])
    with pytest.raises(UserError, match="field 'chosen' is a list.*conversational"):
        load_preference_pairs(path)
    path = tmp_path / "h.json"
    path.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(UserError, match=r"holds an object \(a mapping\), but a \.json source must hold a list"):
        load_preference_pairs(path)


@pytest.mark.parametrize(("value", "kind"), [(1, "an int"), (None, "null"), (2.5, "a float"), (True, "a boolean"),
                                             ({"a": 1}, "an object")])
def test_wrong_field_types_are_named_as_english_reads(tmp_path, value, kind):
    """Issue 29: "field 'chosen' is a int" read as a typo; each JSON type gets its article (and null its name)."""
    path = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": value, "rejected": "r"}])
    with pytest.raises(UserError, match=rf"t\.jsonl line 1: field 'chosen' is {kind}\b.*needs text"):
        load_preference_pairs(path)
    if not isinstance(value, dict):  # a whole row that is no object
        with pytest.raises(UserError, match=rf"r\.jsonl line 1: expected a JSON object .*, got {kind}\.$"):
            load_preference_pairs(_write_jsonl(tmp_path / "r.jsonl", [value]))


def test_empty_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="has no rows"):
        load_preference_pairs(empty)
    with pytest.raises(UserError, match="has no rows"):
        load_preference_pairs("demo", rows="500:")
    useless = _write_jsonl(tmp_path / "useless.jsonl", HH_ROWS[1:4])
    message = "none of the 3 rows.*empty_response 1, identical_responses 1, no_assistant_turn 1"
    with pytest.raises(UserError, match=message):
        load_preference_pairs(useless)


def test_non_utf8(tmp_path):
    for name in ("latin.jsonl", "latin.json"):
        path = tmp_path / name
        good = json.dumps(HH_ROWS[0]).encode()
        bad = b'{"chosen": "caf\xe9"}'  # latin-1, not UTF-8
        path.write_bytes(b"[" + bad + b"]\n" if name.endswith(".json") else good + b"\n" + bad + b"\n")
        line = "1" if name.endswith(".json") else "2"
        with pytest.raises(UserError, match=rf"{name} line {line} is not valid UTF-8"):
            load_preference_pairs(path)


def test_paths_extensions_and_globs(tmp_path):
    (tmp_path / "data.csv").write_text("chosen,rejected\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown extension"):
        load_preference_pairs(tmp_path / "data.csv")
    with pytest.raises(UserError, match="matches no files"):
        load_preference_pairs(str(tmp_path / "*.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_preference_pairs(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="is a folder"):
        load_preference_pairs(tmp_path)
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read"):
        load_preference_pairs(tmp_path / "broken.jsonl.gz")


def test_bad_arguments():
    with pytest.raises(UserError, match="START:STOP"):
        load_preference_pairs("demo", rows="300")
    with pytest.raises(UserError, match="limit=0"):
        load_preference_pairs("demo", limit=0)
    with pytest.raises(UserError, match="'train' and 'test'"):
        load_preference_pairs("demo", split="validation")
    with pytest.raises(UserError, match="leaves no pairs"):
        split_pairs(load_preference_pairs("demo", split="test"), 100, seed=0)


def test_unreachable_hub_names_the_alternatives(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(UserError, match="could not load the hub dataset 'Anthropic/hh-rlhf'.*jsonl.gz.*'demo'"):
        load_preference_pairs("Anthropic/hh-rlhf", data_dir="harmless-base")
