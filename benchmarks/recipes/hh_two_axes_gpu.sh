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
. benchmarks/recipes/gpu_daemon.sh
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
  launch $W "python3 benchmarks/recipes/hh_two_axes.py --model $MODEL --data-root $DATA --work $W \
    --out $W/hh-two-axes.json $REST"
  ;&
wait)
  follow $W "\[hh2\]"
  cp $W/hh-two-axes.json $W/hh-two-axes.md $W/state.json "$OUT"/ 2>/dev/null
  pack $W hh2-runs
  ls -la "$OUT"
  ;;
*) echo "usage: $0 start [--model GGUF] [--data-root DIR] [hh_two_axes.py flags] | wait"; exit 2 ;;
esac
