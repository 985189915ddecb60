#!/usr/bin/env bash
# Does clipping by the previous step's norm (--optim-in-backward with --max-grad-norm > 0) keep what clipping gives?
# CPU, a few minutes: tiny-llama (random init, demo tokenizer) on HH harmless-base rows 300:1612, one epoch, held-out
# loss on rows 1612:1812, four runs a mode: AdamW after backward clipped exactly (clip), unclipped (noclip), AdamW
# inside backward clipped by the previous step's norm (oib), and unclipped (oib-noclip). The clip levels sit between
# the early and the late gradient norms of each mode, so clipping acts on the early steps only, as at lr 5e-4 on a
# GPU (NOTES entry 25).
#   bash benchmarks/checks/clip_in_backward.sh [SHARED_DIR] [WORK_DIR] [JSON_OUT]
set -eu
SHARED=${1:-../shared}
WORK=${2:-/tmp/clip-in-backward}
OUT=${3:-$WORK/clip-in-backward.json}
H=$SHARED/data/hh-rlhf/harmless-base/test.jsonl.gz
C="--model tiny-llama --tokenizer demo --dataset $H --train-rows 300:1612 --eval-data $H --eval-rows 1612:1812
   --batch-size 16 --max-length 256 --epochs 1 --schedule linear --warmup-ratio 0 --eval-every 0 --overwrite"
mkdir -p "$WORK"
for mode in "lora --lr 5e-4 --lora-r 16 --lora-alpha 32 --max-grad-norm 0.2" "full --lr 1e-3 --full --max-grad-norm 0.6"; do
  m=${mode%% *}; f=${mode#* }
  python -m minialign sft $C $f --out "$WORK/$m-clip" > /dev/null 2>&1
  python -m minialign sft $C $f --max-grad-norm 0 --out "$WORK/$m-noclip" > /dev/null 2>&1
  python -m minialign sft $C $f --optim-in-backward --out "$WORK/$m-oib" > /dev/null 2>&1
  python -m minialign sft $C $f --optim-in-backward --max-grad-norm 0 --out "$WORK/$m-oib-noclip" > /dev/null 2>&1
done
python - "$WORK" "$OUT" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = {}
for mode in ("lora", "full"):
    for kind in ("clip", "noclip", "oib", "oib-noclip"):
        rows = [json.loads(x) for x in (work / f"{mode}-{kind}" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
        runs[f"{mode}-{kind}"] = {"eval_loss": [r for r in rows if "eval/loss" in r][-1]["eval/loss"],
                                  "grad_norm_first_5": [round(x, 3) for x in norms[:5]], "grad_norm_last": norms[-1]}
    r = {k: runs[f"{mode}-{k}"]["eval_loss"] for k in ("clip", "noclip", "oib")}
    runs[f"{mode}-gap_recovered"] = (r["noclip"] - r["oib"]) / (r["noclip"] - r["clip"])
out.write_text(json.dumps({"command": "bash benchmarks/checks/clip_in_backward.sh", "device": "cpu", "runs": runs},
                          indent=1))
for k, v in runs.items():
    print(k, v)
PY
