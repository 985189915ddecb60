#!/usr/bin/env bash
# Issue 32 (ahead of Unsloth) on the device tool's GPU machine: bench_e2e.py races minialign against Unsloth (and
# Unsloth at minialign's setting) on four rows, each tool a fresh process per run, alternating, one call's GPU. The
# machine has no internet and each call carries at most 64 MiB, so the inputs travel in three calls:
#
#   call 1 (carry .carry/a .whl):  mkdir -p /tmp/stage && cp .carry/a/part_00 /tmp/ && cp -r .whl /tmp/stage/whl
#   call 2 (carry .carry/b):       cp .carry/b/part_01 /tmp/
#   call 3 (carry .whlu):          bash benchmarks/unsloth_gpu.sh start [ROWS]   # then: bash ... wait
#
# .carry/{a,b}: the SmolLM2 GGUF in two pieces (../shared/README.md); .whl: trl 1.16, datasets 5.2, dill, multiprocess,
# gguf wheels and shared/ (the four HH files); .gl/smollm2: its config and tokenizer. `python benchmarks/gpu_carry.py
# build` makes these, and `... check` says whether each call fits (by room on disk, as the tool counts); .whlu:
# `python benchmarks/unsloth_wheels.py` (Unsloth's own pins, put
# first on its runners' PYTHONPATH only). `start` installs, joins the model and launches the rows detached (an idle
# machine is handed back within ~30 s and a call lasts at most 10 minutes), then follows them like `wait`.
# ROWS: comma list of dpo8, dpo16, sft-lora, sft-full (default: these four, in that order); `decode` (issue 31's
# decoder profile, benchmarks/checks/profile_decode.py) and `hh` (the issue-31 study's online step with the LoRA
# reward model and the loop penalty) can be queued among them. Ready for the next session (each a question NOTES
# entry 23 leaves open): `dpo8-lowmem` (DPO at matched memory), `sft-lora-fast` (llama-1b SFT LoRA with --fast on vs
# off: where the 0.29-nat learning gap comes from), `sft-gap` (the same against TRL: the fast path and
# minialign-lowmem clipped by the previous step's norm and unclipped, the question NOTES entry 25 leaves open),
# `sft-seed1` (sft-gap's TRL and minialign at seed 1: is the +0.03 nats seed noise?), `sft-seeds` (the same at seeds 2
# and 3: minialign trailed by 0.03 and 0.06 at seeds 0 and 1, NOTES entry 29), `sft-gap-data` (TRL's trainer on
# minialign's token ids beside TRL and minialign at seeds 0 and 3: does the 0.055-nat gap follow the data or the
# trainer? NOTES entry 30; the data, entry 31), `sft-keep-start` (minialign with TRL's SFT truncation beside TRL and
# minialign), `sft-order` (TRL on its own examples in minialign's order beside TRL and minialign-keep-start: is the
# rest of the gap the order or the step? NOTES entry 32; $ORDER_SEEDS, default 0, and $ORDER_RUNNERS pick others, e.g.
# ORDER_SEEDS="1 2 3" ORDER_RUNNERS=trl-minialign-order,minialign-keep-start), `dpo-lean` (SmolLM2 DPO at batch 8
# and 16, $LEAN_BATCHES: Unsloth's default against minialign's memory options with offloading and 128-row loss
# chunks, and minialign's default, $LEAN_RUNNERS picks others; the DPO rows at matched memory; needs the GGUF and
# Unsloth's wheels), `decode-sample` (real SmolLM2 weights, sampled answers that finish early as online
# rounds' do, 128 against 256 rows a batch), `decode-random-triton` (the decoder profile with the Triton decode
# kernel, `lite`), `tune-triton` (checks/tune_triton_decode.py: that kernel's tilings against FlashAttention,
# `lite`), `sft-offload` (Unsloth's default against minialign's eager memory options without and with
# --offload-activations; needs Unsloth's wheels), `sft-lean` (Unsloth's default against offloading with and without
# 128-row loss chunks; Unsloth's wheels), `sft-lowmem` (matched memory:
# Unsloth's default against minialign's memory options compiled and eager; Unsloth's wheels in /tmp/usite: `start`
# installs them, or `pip install --no-index --no-deps --target /tmp/usite .whlu/*.whl`), `hh-per-axis` (one online
# reward model an axis, summed), `hh-routed` (the same two, each prompt scored by its own axis's model; candidates
# $HH_CANDIDATES, then TRL's OnlineDPOTrainer given the same routed scoring and the timing, unless HH_TRL is set empty,
# then the independent check on the held-out helpful files, `heldout`).
# A study session (NOTES entry 34): `stage` (carry .carry/a .whl .gl), at once `study CANDIDATES` (carry .carry/b),
# then `study-wait` until the study's exit code shows.
# Results: $OUT/unsloth-peer.json and .md (bench_e2e's format), profile-decode.json, hh-two-axes.json/.md, state.json.
set -u
W=/tmp/uns
TOK=${TOK:-/tmp/model.gguf}  # the llama-1b rows' tokenizer (SmolLM2's); `lite` uses a carried copy instead
. benchmarks/recipes/gpu_daemon.sh
DATA=/tmp/shared/data/hh-rlhf/harmless-base/test.jsonl.gz
# Train on harmless-base rows 300:1612 and score on 1612:1812: rows 0:300 are eval rows and 1812:2312 train judges
# only (../shared/README.md), so the 300:2012 is cut where the reserved rows begin.
SAME="--data $DATA --train-rows 300:1612 --eval-rows 1612:1812 --epochs 1 --schedule linear --warmup-ratio 0 \
 --max-length 512 --max-prompt-length 256 --seed 0 --work $W/e2e --out $W/unsloth-peer.json --append \
 --unsloth-site /tmp/usite --timeout-s 300"

# seed_state: the committed study state as /tmp/hh2's (once), its `online` policy kept as online-<its chosen candidate>
# and TRL's match and every policy's eval flags forgotten (its run folder is another machine's: the heldout phase must
# not evaluate a folder this call retrains under the old name), so a rerun adds rows instead of replacing them.
seed_state() {
  [ -f /tmp/hh2/state.json ] || python3 -c "import json; \
s = json.load(open('benchmarks/results/hh-two-axes-state.json')); p = s['policies']; \
p.update({'online-' + s['chosen']['name']: p.pop('online')} if 'online' in p else {}); \
[q.pop('flags', None) for q in p.values()]; \
s.pop('trl_online_candidate', None); json.dump(s, open('/tmp/hh2/state.json', 'w'))"
}

row() {
  case "$1" in
    dpo8) python3 benchmarks/bench_e2e.py --task dpo --mode lora --model /tmp/model.gguf --tokenizer /tmp/model.gguf \
      --checkpoint $W/smollm2 --chat-template --batch-size 8 --lr 5e-4 --beta 0.1 --lora-r 16 --lora-alpha 32 \
      --runners unsloth,minialign --label smollm2-dpo-lora-b8 $SAME ;;
    dpo16) python3 benchmarks/bench_e2e.py --task dpo --mode lora --model /tmp/model.gguf --tokenizer /tmp/model.gguf \
      --checkpoint $W/smollm2 --chat-template --batch-size 16 --lr 5e-4 --beta 0.1 --lora-r 16 --lora-alpha 32 \
      --runners unsloth,minialign --label smollm2-dpo-lora-b16 $SAME ;;
    sft-lora) python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b --tokenizer $TOK \
      --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners unsloth,minialign,unsloth-ours,minialign-lowmem --label llama1b-sft-lora $SAME ;;
    sft-full) python3 benchmarks/bench_e2e.py --task sft --mode full --model llama-1b --tokenizer $TOK \
      --checkpoint $W/llama1b --batch-size 16 --lr 1e-5 \
      --runners unsloth,minialign --label llama1b-sft-full $SAME ;;
    dpo8-lowmem) python3 benchmarks/bench_e2e.py --task dpo --mode lora --model /tmp/model.gguf --tokenizer /tmp/model.gguf \
      --checkpoint $W/smollm2 --chat-template --batch-size 8 --lr 5e-4 --beta 0.1 --lora-r 16 --lora-alpha 32 \
      --runners unsloth,minialign-lowmem --label smollm2-dpo-lora-b8-lowmem $SAME ;;
    dpo-lean) for b in ${LEAN_BATCHES:-8 16}; do python3 benchmarks/bench_e2e.py --task dpo --mode lora --model /tmp/model.gguf \
      --tokenizer /tmp/model.gguf --checkpoint $W/smollm2 --chat-template --batch-size $b --lr 5e-4 --beta 0.1 --lora-r 16 \
      --lora-alpha 32 --runners ${LEAN_RUNNERS:-unsloth,minialign-lowmem-lean,minialign} --label smollm2-dpo-lora-b$b-lean $SAME
      done ;;
    sft-lora-fast) python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b --tokenizer $TOK \
      --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners minialign,minialign-eager --label llama1b-sft-lora-fast-off $SAME ;;
    sft-gap) python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b --tokenizer $TOK \
      --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners trl,minialign,minialign-lowmem,minialign-lowmem-unclipped --label llama1b-sft-lora-gap $SAME ;;
    sft-seed1) python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b --tokenizer $TOK \
      --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners trl,minialign --label llama1b-sft-lora-seed1 ${SAME/--seed 0/--seed 1} ;;
    sft-lowmem) python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b --tokenizer $TOK \
      --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners unsloth,minialign-lowmem,minialign-lowmem-eager --label llama1b-sft-lora-lowmem $SAME ;;
    sft-offload) python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b --tokenizer $TOK \
      --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners unsloth,minialign-lowmem-eager,minialign-lowmem-offload --label llama1b-sft-lora-offload $SAME ;;
    sft-lean) python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b --tokenizer $TOK \
      --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners unsloth,minialign-lowmem-offload,minialign-lowmem-lean --label llama1b-sft-lora-lean $SAME ;;
    sft-seeds) for seed in 2 3; do python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b \
      --tokenizer $TOK --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners trl,minialign --label llama1b-sft-lora-seed$seed ${SAME/--seed 0/--seed $seed}; done ;;
    sft-gap-data) for seed in ${GAP_SEEDS:-0 3}; do python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b \
      --tokenizer $TOK --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners trl,trl-minialign-data,minialign --label llama1b-sft-lora-data-seed$seed ${SAME/--seed 0/--seed $seed}; done ;;
    sft-keep-start) python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b --tokenizer $TOK \
      --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners ${KS_RUNNERS:-trl,minialign-keep-start,minialign} --label llama1b-sft-lora-keep-start $SAME ;;
    sft-order) for seed in ${ORDER_SEEDS:-0}; do python3 benchmarks/bench_e2e.py --task sft --mode lora --model llama-1b \
      --tokenizer $TOK --checkpoint $W/llama1b --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --runners ${ORDER_RUNNERS:-trl,trl-minialign-order,minialign-keep-start} \
      --label llama1b-sft-lora-order$([ "$seed" = 0 ] || echo "-seed$seed") ${SAME/--seed 0/--seed $seed}; done ;;
    hh-per-axis) seed_state
      python3 benchmarks/recipes/hh_two_axes.py --model /tmp/model.gguf --data-root /tmp/shared --work /tmp/hh2 \
        --out /tmp/hh2/hh-two-axes.json --phases judges,online-rm,online --online-rm per-axis \
        --candidates r1-rpo1-lp4,r2-rpo1-lp4-g ;;
    decode) python3 benchmarks/checks/profile_decode.py --model /tmp/model.gguf --data $DATA \
      --json-out $W/profile-decode.json 2>&1 | grep -v Warning | tail -60 ;;
    decode-random) python3 benchmarks/checks/profile_decode.py --model /tmp/smollm2-random --data $DATA \
      --json-out $W/profile-decode-random.json 2>&1 | grep -v Warning | tail -60 ;;
    tune-triton) python3 benchmarks/checks/tune_triton_decode.py --model /tmp/smollm2-random --data $DATA --rows 300:556 \
      --json-out $W/tune-triton.json 2>&1 | grep -v Warning | tail -40 ;;
    decode-random-triton) python3 benchmarks/checks/profile_decode.py --model /tmp/smollm2-random --data $DATA \
      --attention triton --json-out $W/profile-decode-random-triton.json 2>&1 | grep -v Warning | tail -60 ;;
    memory-peak) python3 benchmarks/checks/memory_peak.py --json-out $W/memory-peak.json -- sft --model llama-1b \
      --tokenizer $TOK --dataset $DATA --train-rows 300:1612 --batch-size 16 --lr 5e-4 --lora-r 16 --lora-alpha 32 \
      --max-length 512 --max-steps 12 --eval-every 0 --overwrite --out $W/peak-run 2>&1 | grep -v "it/s\]" | tail -40 ;;
    check-graphs) python3 benchmarks/checks/check_graphs.py --task sft --mode lora --out $W/check-graphs.json 2>&1 \
      | grep -v "it/s\]" | tail -30 ;;
    bench-decode-random) python3 benchmarks/bench_decode.py --model /tmp/smollm2-random --data $DATA --rows 300:556 \
      --batch-sizes 256 --decoders ${DECODERS:-hf,static,static-triton,hf-static} --json-out $W/decode-random.json 2>&1 | grep -v Warning | tail -30 ;;
    decode-sample) python3 benchmarks/bench_decode.py --model /tmp/model.gguf --data $DATA --rows 300:812 \
      --batch-sizes 128,256 --decoders ${SAMPLE_DECODERS:-static} --sample --json-out $W/decode-sample.json 2>&1 \
      | grep -v Warning | tail -8 ;;
    hh-routed) seed_state
      python3 benchmarks/recipes/hh_two_axes.py --model /tmp/model.gguf --data-root /tmp/shared --work /tmp/hh2 \
        --out /tmp/hh2/hh-two-axes.json --phases judges,online-rm,online${HH_TRL-,trl-online,timing},heldout \
        --online-rm routed --candidates ${HH_CANDIDATES:-r1-rpo1-lp4,r4-rpo1-lp4-g} --jobs ${HH_JOBS:-1} ;;
    hh) seed_state
      python3 benchmarks/recipes/hh_two_axes.py --model /tmp/model.gguf --data-root /tmp/shared --work /tmp/hh2 \
        --out /tmp/hh2/hh-two-axes.json --phases judges,online-rm,online --online-rm lora \
        --candidates r1-rpo1-lp4,r2-rpo1-lp4 ;;
    after-hh) while [ ! -f /tmp/hh2/DONE ]; do sleep 5; done ;;  # queue timed rows behind a study launched apart
    *) echo "unknown row $1"; return 2 ;;
  esac
}

# collect: follow the rows (see follow), then gather.
collect() {
  follow $W "^\[(rows|e2e|hh2)\]|Error|error:|Traceback" 70
  gather
}

# gather: copy every result any row writes (absent ones are skipped) to $OUT, with the logs.
gather() {
  cp $W/unsloth-peer.json $W/unsloth-peer.md $W/profile-decode*.json $W/tune-triton.json $W/decode-random.json $W/decode-sample.json $W/check-graphs.json $W/memory-peak.json \
    /tmp/hh2/hh-two-axes.json /tmp/hh2/hh-two-axes.md /tmp/hh2/state.json "$OUT"/ 2>/dev/null
  tar czf "$OUT"/logs.tgz -C $W log.txt e2e/logs 2>/dev/null
  ls -la "$OUT"
}

case "${1:-}" in
start)
  ROWS=${2:-dpo8,dpo16,sft-lora,sft-full}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/stage/whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/usite \
    .whlu/*.whl || exit 1
  cat /tmp/part_00 /tmp/part_01 > /tmp/model.gguf && sha256sum /tmp/model.gguf || exit 1
  mkdir -p /tmp/repo $W /tmp/hh2 && cp -r /tmp/stage/whl/shared /tmp/shared
  tar cf - --exclude=.carry --exclude=.whl --exclude=.whlu . | tar xf - -C /tmp/repo
  cd /tmp/repo
  launch $W "for r in \$(echo $ROWS | tr , ' '); do echo \"[rows] \$r \$(date +%T)\"; \
    bash benchmarks/unsloth_gpu.sh row \$r; done"
  ;&
wait) collect ;;
lite)
  # One call, no GGUF (carry .whl .gl, and .whlu for Unsloth's rows): rows that need SmolLM2's tokenizer and shapes
  # only, i.e. sft-gap, sft-lora-fast, memory-peak (what fills memory at llama-1b SFT LoRA's peak, checks/memory_peak.py), check-graphs
  # (checks/check_graphs.py: graphed = plain training, uncompiled, several captures), decode-random (the decoder
  # profile on random SmolLM2-135M weights built from .gl/smollm2's config: every row runs all max_new_tokens, so the
  # step time is measured without early finishes; decode-random-triton: the same with minialign's Triton
  # store-and-attend kernel) and bench-decode-random (bench_decode.py's static decoder with
  # FlashAttention and with minialign's Triton store-and-attend kernel, against transformers'
  # dynamic and static+compile caches, same weights; $DECODERS picks fewer, e.g. static,static-triton).
  ROWS=${2:-sft-gap,check-graphs,bench-decode-random,decode-random}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  # Unsloth's wheels where the call carried them too (.whlu: 27.9 MiB on disk with .whl .gl): the Unsloth rows
  # (sft-lean, sft-lowmem, sft-offload) on llama-1b need no GGUF, so one call can race the decoders and run them.
  if ls .whlu/*.whl > /dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/usite .whlu/*.whl || exit 1; fi
  mkdir -p /tmp/repo $W && cp -r .whl/shared /tmp/shared && cp -r .gl/smollm2 /tmp/smollm2-tok
  tar cf - --exclude=.carry --exclude=.whl --exclude=.whlu --exclude=.gl . | tar xf - -C /tmp/repo
  cd /tmp/repo
  PYTHONPATH=/tmp/repo python3 -c "import sys, torch, transformers as t; \
m = t.AutoModelForCausalLM.from_config(t.AutoConfig.from_pretrained(sys.argv[1])); \
m.to(torch.bfloat16).save_pretrained(sys.argv[2]); t.AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])" \
    /tmp/smollm2-tok /tmp/smollm2-random || exit 1
  launch $W "for r in \$(echo $ROWS | tr , ' '); do echo \"[rows] \$r \$(date +%T)\"; \
    TOK=/tmp/smollm2-tok bash benchmarks/unsloth_gpu.sh row \$r; done"
  collect
  ;;
stage)
  # A study session's first call (carry .carry/a .whl .gl): the first GGUF piece staged for `study`, lite's ROWS
  # launched (default: the decoder race, timed alone, then sft-order, learning only, which may share the GPU with the
  # study); it returns once the first row has ended (or after WAIT_S, default 420 s, inside one call's 600), so
  # `study` can start at once.
  cp .carry/a/part_00 /tmp/ || exit 1
  WAIT_S=0 bash "$0" lite "${2:-bench-decode-random,sft-order}" > /tmp/stage-lite.log 2>&1 \
    || { tail -20 /tmp/stage-lite.log; echo "stage: lite failed (above)"; exit 1; }
  WAIT_S=${WAIT_S:-420} until_lines $W "^\[rows\] " 2
  gather
  ;;
study)
  # The second call, right after `stage` on the same machine (carry .carry/b): join the GGUF, launch the two-axis
  # study's routed phases with candidates $2 (without TRL's online peer and the timing unless HH_TRL is set to
  # ",trl-online,timing"), $HH_JOBS (default 4) commands at once on the GPU (hh_two_axes.py --jobs), follow it.
  CANDIDATES=${2:?"usage: $0 study CANDIDATES (comma list of hh_plan.CANDIDATES)"}
  [ -f /tmp/part_00 ] && [ -d /tmp/repo ] || { echo "this machine has no staged piece: run stage first"; exit 3; }
  cp .carry/b/part_01 /tmp/ && cat /tmp/part_00 /tmp/part_01 > /tmp/model.gguf && sha256sum /tmp/model.gguf || exit 1
  cd /tmp/repo
  HH_TRL=${HH_TRL-} HH_CANDIDATES=$CANDIDATES HH_JOBS=${HH_JOBS:-4} launch /tmp/hh2 "bash benchmarks/unsloth_gpu.sh row hh-routed"
  follow /tmp/hh2 "^\[hh2\]|Error|error:|Traceback" 40
  gather
  ;;
study-wait)
  # Later calls: follow the study, then bring back its summary, the lite rows' results and its small files.
  cd /tmp/repo 2>/dev/null || { echo "nothing runs on this machine: it was handed back; start again"; exit 3; }
  follow /tmp/hh2 "^\[hh2\]|Error|error:|Traceback" 40
  grep -E "^\[rows\]|Error|Traceback" $W/log.txt | tail -10
  gather
  pack /tmp/hh2 hh2-runs || true  # tar says 1 when the running study writes a file it reads: the pack still comes
  ;;
row) shift; row "$@" ;;
*) echo "usage: $0 start [ROWS] | lite [ROWS] | wait | row NAME | stage [ROWS] | study CANDIDATES | study-wait"
   exit 2 ;;
esac
