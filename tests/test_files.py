"""minialign.base.files: a file written atomically by several threads of one process at once (the two-axis
study's --jobs saves its state from threads) ends whole, with no error and no temporary file left."""

import json
import threading

from minialign.base.files import write_atomic


def test_state_files_survive_writes_from_several_threads(tmp_path):
    path, errors = tmp_path / "state.json", []

    def write(i: int) -> None:
        try:
            for j in range(40):
                write_atomic(path, json.dumps({"writer": i, "n": j}))
        except OSError as exc:  # a temporary shared by two threads: one's rename takes the other's file away
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and json.loads(path.read_text())["n"] == 39
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind
