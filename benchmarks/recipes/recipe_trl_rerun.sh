#!/usr/bin/env bash
# Second GPU call of the recipe (2026-12-05): the first call's final phase scored TRL's adapter with `minialign eval`
# on a plain --policy, where --chat-template auto means off, so TRL's answers were generated from bare HH prompts
# while TRL had trained on chat-template text. This call retrains TRL identically (bench_e2e.py, trl runner), retrains
# the same judge (same command and seed as recipe_sweep.py's judge-harmless), scores TRL's answers with
# --chat-template on, and tries one stronger judge setting (more steps, rank 16). Same set-up as recipe_gpu.sh.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MINIALIGN_CACHE=/tmp/mcache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
cat /tmp/part_00 .carry/b/part_01 > /tmp/model.gguf
M=/tmp/model.gguf; HH=.whl/shared/data/hh-rlhf/harmless-base/test.jsonl.gz; W=/tmp/r2; mkdir -p $W
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
JUDGE="--model $M --dataset $HH --train-rows 2012:2312 --eval-data $HH --eval-rows 1812:2012 --eval-limit 1000
  --batch-size 16 --eval-every 0 --overwrite --chat-template"
t judge-harmless; python3 -m minialign rm $JUDGE --epochs 2 --out $W/judge-harmless 2>&1 | grep "minialign rm"
t judge-strong; python3 -m minialign rm $JUDGE --epochs 4 --lr 5e-4 --lora-r 16 --lora-alpha 32 --out $W/judge-strong \
  2>&1 | grep "minialign rm"
t trl; python3 benchmarks/bench_e2e.py --task dpo --mode lora --model $M --tokenizer $M --data $HH --train-rows 300:1812 \
  --eval-rows 0:300 --batch-size 16 --lora-r 8 --lora-alpha 16 --lr 5e-4 --beta 0.1 --epochs 2 --schedule linear \
  --warmup-ratio 0 --runners trl --label smollm2-dpo --work $W/e2e --out $OUT/e2e-trl-rerun.json --timeout-s 300 \
  --chat-template 2>&1 | grep "\[e2e\]"
t eval-trl; python3 -m minialign eval --policy $M --adapter $W/e2e/smollm2-dpo-trl/final --reference $M \
  --judge $W/judge-harmless --chat-template on --dataset $HH --rows 0:300 --n 100 --samples 4 --max-new-tokens 128 \
  --batch-size 256 --out $W/eval-trl 2>&1 | tail -22
cp $W/eval-trl/eval.json $OUT/eval-trl.json; cp $W/eval-trl/eval.md $OUT/eval-trl.md
for j in judge-harmless judge-strong; do cp $W/$j/summary.json $OUT/$j-summary.json; done
t done
