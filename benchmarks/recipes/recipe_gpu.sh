#!/usr/bin/env bash
# benchmarks/recipes/recipe_sweep.py on the device tool's GPU machine, which outlives no call and has no network.
#
#   bash benchmarks/recipes/recipe_gpu.sh start   # join the model, install the carried wheels, start the sweep as a daemon
#   bash benchmarks/recipes/recipe_gpu.sh wait    # follow it until it ends or this call's time is nearly up; copy results
#
# Expects (git-ignored, carried): .whl/ (trl, datasets, dill, multiprocess, gguf wheels + a copy of ../shared under
# .whl/shared) and the SmolLM2 GGUF split in two (/tmp/part_00 copied there by an earlier call, .carry/b/part_01).
# The sweep runs from a copy of the repository in /tmp, so the next call's fresh working tree cannot disturb it.
set -u
W=/tmp/recipe
. benchmarks/recipes/gpu_daemon.sh
case "${1:-}" in
start)
  . benchmarks/recipes/gpu_setup.sh
  launch $W "python3 benchmarks/recipes/recipe_sweep.py --model ${MODEL:-/tmp/model.gguf} --data-root /tmp/shared \
    --work $W --out $W/recipe-sweep.json ${SWEEP_ARGS:-}"
  ;&
wait)
  follow $W "\[recipe\]" 40
  cp $W/recipe-sweep.json $W/recipe-sweep.md "$OUT"/ 2>/dev/null
  pack $W recipe-runs
  ls -la "$OUT"
  ;;
*) echo "usage: $0 start|wait"; exit 2 ;;
esac
