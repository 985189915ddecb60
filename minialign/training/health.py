"""What the training loop checks in the metrics it reads back anyway (so the step gains no host sync): a loss or
gradient norm that is not finite, and a gradient that is exactly zero from the first step."""

from __future__ import annotations

import math
from pathlib import Path

from minialign.base.errors import UserError
from minialign.training import checkpoint


class TrainingDiverged(UserError):
    pass


def check_finite(rows: list[dict], run_dir: Path | None) -> None:
    """A loss or gradient norm that is not finite stops the run, naming its last good checkpoint. The gradient norm
    too: a NaN/inf gradient with a finite loss has already corrupted the weights."""
    for row in rows:
        bad = next((k for k in ("loss", "grad_norm") if not math.isfinite(row.get(k, 0.0))), None)
        if bad is not None:
            where = checkpoint.latest_checkpoint(run_dir) if run_dir is not None else None
            kept = f"The last good checkpoint is {where}." if where else "No checkpoint had been written yet."
            name = "loss" if bad == "loss" else "gradient norm"
            raise TrainingDiverged(
                f"The {name} became {row[bad]} at step {row['step']}; training stopped. {kept} "
                "Lower --lr, raise --warmup-ratio or check the data."
            )


def check_learning(rows: list[dict]) -> None:
    """The first rows a run reads back (no extra sync: the loop reads them anyway): a gradient norm of exactly 0 on
    every step means no gradient reaches the trained weights, so the run would change nothing."""
    if rows and rows[0]["step"] == 1 and all(row.get("grad_norm", 1.0) == 0.0 for row in rows):
        raise UserError(
            f"The gradient norm was exactly 0 on each of the first {len(rows)} steps (loss {rows[-1]['loss']:.4f}): "
            "no gradient reaches the trained weights, so training would change nothing. Check that the data "
            "tokenizes to real text with this tokenizer (`minialign data SOURCE --tokenizer TOKENIZER`), then start "
            "again with --overwrite.")
