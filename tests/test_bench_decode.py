"""benchmarks/bench_decode.py on the CPU: tiny Llama, two real HH prompts, a few tokens. The speeds mean nothing here;
what is checked is that every decoder runs, the JSON holds each one's measures and the command, and the static
decoder's greedy answers equal transformers' (float32)."""

import json

from tests.conftest import load_benchmark


def test_decode_benchmark_smoke_run(tmp_path, shared_dir):
    bench = load_benchmark("bench_decode")
    out = tmp_path / "decode.json"
    bench.main(["--model", "tiny-llama", "--tokenizer", "demo", "--rows", "0:2", "--batch-sizes", "2",
                "--max-new-tokens", "4", "--repeats", "1", "--data",
                str(shared_dir / "data/hh-rlhf/harmless-base/test.jsonl.gz"), "--json-out", str(out)])
    result = json.loads(out.read_text())
    assert "bench_decode.py" in result["command"] and result["prompts"] == 2
    rows = result["results"]["2"]
    assert set(rows) == {"hf", "static", "static-plain", "static-flex", "static-triton",
                         "static-triton-compiled-prefill", "static-triton-early-looks", "hf-static"}
    assert all(rows[name]["identical_to_static"] == 1.0
               for name in ("static-flex", "static-triton", "static-triton-compiled-prefill", "static-triton-early-looks"))
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("traceback"))
        assert row["new_tokens"] == rows["hf"]["new_tokens"] and 0 < row["new_tokens"] <= 8
        assert row["decode_steps"] == 4 and row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
        assert row["warmup_s"] > 0
        assert row["identical_to_hf"] == 1.0
    assert rows["static-triton-early-looks"]["identical_to_static_triton"] == 1.0
