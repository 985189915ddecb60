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
case "${1:-}" in
start)
  . benchmarks/recipes/gpu_setup.sh
  mkdir -p $W
  env PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    MINIALIGN_CACHE=/tmp/mcache PYTHONPATH=/tmp/site:/tmp/repo \
    setsid nohup sh -c "python3 benchmarks/recipes/recipe_sweep.py --model ${MODEL:-/tmp/model.gguf} --data-root /tmp/shared \
      --work $W --out $W/recipe-sweep.json ${SWEEP_ARGS:-}; echo \$? > $W/DONE" > $W/log.txt 2>&1 < /dev/null &
  sleep 5
  ;&
wait)
  [ -f $W/log.txt ] || { echo "no sweep on this machine ($W/log.txt missing): it was handed back; start again"; exit 3; }
  end=$(( $(date +%s) + ${WAIT_S:-540} ))
  while [ ! -f $W/DONE ] && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
  grep "\[recipe\]" $W/log.txt | cut -c1-220 | tail -40
  [ -f $W/DONE ] && echo "sweep exit code $(cat $W/DONE)"
  cp $W/recipe-sweep.json $W/recipe-sweep.md "$OUT"/ 2>/dev/null
  tar czf "$OUT"/recipe-runs.tgz -C $W --exclude='*.safetensors' --exclude='*.pt' --exclude=checkpoints \
    --exclude=cache --exclude=tokenizer --exclude=trainer . 2>/dev/null
  ls -la "$OUT"
  ;;
*) echo "usage: $0 start|wait"; exit 2 ;;
esac
