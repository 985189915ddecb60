"""benchmarks/checks/memory_peak.py's replay and grouping, on made-up allocator events (the GPU run itself cannot
happen here): the peak is the most bytes live at once, charged to the innermost frame in our own code."""

import pytest

from tests.conftest import BENCHMARKS, load_benchmark


@pytest.fixture(scope="module")
def peak():
    return load_benchmark("memory_peak", BENCHMARKS / "checks")


def frames(*names):
    return [{"filename": f, "name": n, "line": 1} for f, n in names]


OURS = frames(("/x/torch/nn/functional.py", "linear"), ("/r/minialign/modeling/lora.py", "forward"),
              ("/r/minialign/training/train.py", "train"))
LIB = frames(("/x/transformers/models/llama/modeling_llama.py", "forward"))


def test_the_peak_is_the_most_bytes_live_at_once_and_which_blocks_made_it(peak):
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": OURS},
        {"action": "alloc", "addr": 2, "size": 50, "frames": LIB},
        {"action": "free_requested", "addr": 2},  # not yet reusable: still counted
        {"action": "alloc", "addr": 3, "size": 30, "frames": OURS},  # 180: the peak
        {"action": "free_completed", "addr": 2},
        {"action": "free_completed", "addr": 99},  # allocated before the recording started: ignored
        {"action": "alloc", "addr": 4, "size": 40, "frames": LIB},  # 170
        {"action": "segment_alloc", "addr": 5, "size": 10**9},  # segments are not allocations
    ]
    best, live = peak.peak_live(events)
    assert best == 180 and sorted(live) == [1, 2, 3]
    rows = peak.by_site(live)
    assert rows[0]["site"] == "minialign/modeling/lora.py:forward" and rows[0]["blocks"] == 2
    assert rows[1]["site"] == "transformers/models/llama/modeling_llama.py:forward"
    assert sum(r["blocks"] for r in rows) == 3


def test_sites_beyond_the_top_are_summed_and_no_stack_is_unknown(peak):
    blocks = {i: {"size": 2**20 * (i + 1), "frames": frames((f"/r/minialign/m{i}.py", "f"))} for i in range(5)}
    blocks[9] = {"size": 2**20, "frames": []}
    rows = peak.by_site(blocks, top=2)
    assert [r["site"] for r in rows] == ["minialign/m4.py:f", "minialign/m3.py:f", "other"]
    assert rows[-1]["mib"] == pytest.approx(1 + 2 + 3 + 1) and rows[-1]["blocks"] == 4
    assert peak.site([]) == "unknown"


def test_it_needs_a_command(peak, capsys):
    with pytest.raises(SystemExit):
        peak.main(["--json-out", "/tmp/x.json"])
    assert "give the minialign command after --" in capsys.readouterr().err
