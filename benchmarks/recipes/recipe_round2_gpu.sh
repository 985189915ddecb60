#!/usr/bin/env bash
# Round 2 of the recipe on the device tool's GPU machine, as one daemon (set-up as recipe_gpu.sh: .whl/ and
# .carry/b carried, /tmp/part_00 copied by the call before):
#
#   bash benchmarks/recipes/recipe_round2_gpu.sh start   # join the model, install the wheels, start the daemon, follow it
#   bash benchmarks/recipes/recipe_round2_gpu.sh wait    # follow it until it ends or this call's time is nearly up
#
# In order, so a cut-off run keeps the most wanted numbers: the judges, the reward-model number and round 1's answers
# judged again (recipe_round2.py); the whole-command wall clock against TRL (bench_e2e.py, as round 1's final phase
# ran it); `minialign run`'s LoRA-vs-full table; then round 2's candidates and, if one is chosen, its final phase.
set -u
W=/tmp/round2
. benchmarks/recipes/gpu_daemon.sh
case "${1:-}" in
start)
  . benchmarks/recipes/gpu_setup.sh
  mkdir -p $W
  M=/tmp/model.gguf HH=/tmp/shared/data/hh-rlhf/harmless-base/test.jsonl.gz
  R2="python3 benchmarks/recipes/recipe_round2.py --round1 benchmarks/results/recipe-h200.json --answers examples/hh-smollm2/eval"
  R2="$R2 --model $M --data-root /tmp/shared --work $W --out $W/recipe-round2.json"
  cat > $W/pipeline.sh <<EOF
$R2 --phases judges,rm,rescore
python3 benchmarks/bench_e2e.py --task dpo --mode lora --model $M --tokenizer $M --data $HH --train-rows 300:1812 \
  --eval-rows 0:300 --batch-size 16 --lora-r 8 --lora-alpha 16 --lr 5e-4 --beta 0.1 --epochs 2 --schedule linear \
  --warmup-ratio 0 --runners trl,minialign --label smollm2-dpo --work $W/e2e --out $W/e2e-smollm2.json \
  --timeout-s 300 --chat-template
python3 -m minialign run --stages lora --model pythia-70m --tokenizer /tmp/shared/tokenizers/gpt-neox-20b/tokenizer.json \
  --train-data $HH --train-rows 300: --eval-data $HH --eval-rows 0:300 --out $W/lora-check --overwrite
$R2 --phases sweep,final
EOF
  launch $W "sh -x $W/pipeline.sh"
  ;&
wait)
  follow $W "\[recipe\]|\[e2e\]|^\+ |minialign run|lora"
  cp $W/recipe-round2.json $W/recipe-round2.md $W/e2e-smollm2.json $W/e2e-smollm2.md "$OUT"/ 2>/dev/null
  cp $W/lora-check/results.json "$OUT"/run-lora.json 2>/dev/null
  pack $W round2-runs
  ls -la "$OUT"
  ;;
*) echo "usage: $0 start|wait"; exit 2 ;;
esac
