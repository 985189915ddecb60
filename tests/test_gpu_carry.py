"""benchmarks/gpu_carry.py: the GGUF pieces join back to the file, and a call over the limit is caught here."""

from __future__ import annotations

import hashlib
import os
import subprocess

from tests.conftest import load_benchmark

carry = load_benchmark("gpu_carry")


def test_the_pieces_join_back_to_the_file_and_the_first_has_the_pieces_length(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    first, second = tmp_path / "a" / "part_00", tmp_path / "b" / "part_01"
    digest = carry.split(src, first, second, piece=4096)
    assert first.stat().st_size == 4096 and second.stat().st_size == 10240 - 4096
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    assert first.read_bytes() + second.read_bytes() == src.read_bytes()


def _repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("/.carry/\n")
    (root / "code.py").write_text("x = 1\n")
    (root / ".carry").mkdir()
    (root / ".carry" / "big").write_bytes(os.urandom(20000))  # not zeros: a compressing file system shrinks those
    return root


def test_a_call_counts_the_tree_and_its_folders_by_bytes_and_by_disk_room(tmp_path, capsys):
    root = _repo(tmp_path)
    tree = {p.name for p in carry.tree_files(root)}
    assert tree == {".gitignore", "code.py"}  # untracked but not ignored travels; the ignored folder does not
    size = carry.call_sizes([".carry"], root)
    assert size["bytes"] == 20000 + len("/.carry/\n") + len("x = 1\n")
    assert size["on_disk"] >= size["bytes"]  # whole blocks: the count the device tool refuses by
    assert carry.check({"fits": [".carry"]}, root, limit=10**6) == []
    tree_only = carry.call_sizes([], root)
    assert carry.check({"tree": []}, root, limit=max(tree_only.values())) == []
    assert carry.check({"over": [".carry"]}, root, limit=size["bytes"] - 1) == ["over"]
    if size["on_disk"] > size["bytes"]:  # fits by bytes, not by room on disk: refused, as the tool would
        assert carry.check({"room": [".carry"]}, root, limit=size["bytes"]) == ["room"]
    assert carry.check({"gone": [".whl"]}, root) == ["gone"]  # a folder not built yet is a failed check
    assert carry.check({"peer": [".whlu"]}, root) == ["peer"]
    out = capsys.readouterr().out
    assert "OVER" in out and "`python benchmarks/gpu_carry.py build`" in out
    assert "`python benchmarks/unsloth_wheels.py`" in out  # the script that makes that one
    (root / "shared").mkdir()  # a shared/ folder travels too, ignored or not
    (root / "shared" / "data").write_bytes(b"x" * 100)
    assert carry.call_sizes([], root)["bytes"] == tree_only["bytes"] + 100

