#!/usr/bin/env bash
# benchmarks/recipes/hh_two_axes.py (issue 31: helpful and harmless) on the device tool's GPU machine, as one daemon:
# one device call lasts at most 10 minutes and an idle machine is handed back within about 30 s, so `start` launches
# the study detached and follows it, and each later call `wait`s on it (set-up as recipe_round2_gpu.sh: .whl/ and
# .carry/b carried, /tmp/part_00 copied by the call before; benchmarks/recipes/gpu_setup.sh joins the model).
#
#   bash benchmarks/recipes/hh_two_axes_gpu.sh start [--model /tmp/model.gguf] [--data-root DIR] [STUDY FLAGS...]
#   bash benchmarks/recipes/hh_two_axes_gpu.sh wait  # follow it until it ends or this call's time is nearly up
#
# --model: the SmolLM2 GGUF (default /tmp/model.gguf, which gpu_setup.sh joins); --data-root: the folder holding
# data/hh-rlhf/{harmless-base,helpful-base}/test.jsonl.gz (default /tmp/shared, gpu_setup.sh's copy of .whl/shared;
# a carried folder elsewhere is copied to /tmp first, since the daemon outlives this call's working tree). Other
# flags go to hh_two_axes.py (e.g. --phases judges,harmless-only --candidates r1-rpo1). Phases and their times: the
# script's docstring (~16-18 min on one H100). Results: hh-two-axes.json/.md and the runs' small files in $OUT.
set -u
W=/tmp/hh2
case "${1:-}" in
start)
  shift
  MODEL=/tmp/model.gguf DATA=/tmp/shared REST=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --model) MODEL=$2; shift 2 ;;
      --data-root) DATA=$(realpath "$2"); shift 2 ;;
      *) REST="$REST $1"; shift ;;
    esac
  done
  case "$DATA" in /tmp/*) ;; *) mkdir -p /tmp/hh-data && cp -r "$DATA"/. /tmp/hh-data/ && DATA=/tmp/hh-data ;; esac
  . benchmarks/recipes/gpu_setup.sh
  mkdir -p $W
  env PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 \
    MINIALIGN_CACHE=/tmp/mcache PYTHONPATH=/tmp/site:/tmp/repo \
    setsid nohup sh -c "python3 benchmarks/recipes/hh_two_axes.py --model $MODEL --data-root $DATA --work $W \
      --out $W/hh-two-axes.json $REST; echo \$? > $W/DONE" > $W/log.txt 2>&1 < /dev/null &
  sleep 5
  ;&
wait)
  # a machine handed back between calls comes back bare: say so at once rather than wait for a study that is gone
  [ -f $W/log.txt ] || { echo "no study on this machine ($W/log.txt missing): it was handed back; start again"; exit 3; }
  end=$(( $(date +%s) + ${WAIT_S:-540} ))
  while [ ! -f $W/DONE ] && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
  grep "\[hh2\]" $W/log.txt | cut -c1-220 | tail -60
  [ -f $W/DONE ] && echo "study exit code $(cat $W/DONE)"
  cp $W/hh-two-axes.json $W/hh-two-axes.md $W/state.json "$OUT"/ 2>/dev/null
  tar czf "$OUT"/hh2-runs.tgz -C $W --exclude='*.safetensors' --exclude='*.pt' --exclude=checkpoints \
    --exclude=cache --exclude=tokenizer --exclude=trainer --exclude='*.gguf' --exclude=data . 2>/dev/null
  ls -la "$OUT"
  ;;
*) echo "usage: $0 start [--model GGUF] [--data-root DIR] [hh_two_axes.py flags] | wait"; exit 2 ;;
esac
