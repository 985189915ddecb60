# Sourced by the *_gpu.sh scripts: run work detached on the device tool's GPU machine and follow it across calls. One
# call lasts at most 10 minutes and an idle machine is handed back within about 30 s, so `launch` starts the work in
# a session of its own (it outlives the call that started it) and each later call `follow`s it.

# launch W COMMAND...: the shell command, from the current folder, detached; its log in W/log.txt, its exit code in
# W/DONE. The environment: unbuffered logs, no hub or telemetry requests, the carried wheels and the repository copy.
launch() {
  local w=$1
  shift
  mkdir -p "$w"
  rm -f "$w/DONE"  # an earlier run's exit code would end every wait on this one at once
  env PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 \
    UNSLOTH_DISABLE_STATISTICS=1 MINIALIGN_CACHE=/tmp/mcache PYTHONPATH=/tmp/site:/tmp/repo \
    setsid nohup sh -c "( $* ); echo \$? > $w/DONE" > "$w/log.txt" 2>&1 < /dev/null &
  sleep 5
}

# await_lines W PATTERN N: wait until N lines of W/log.txt match PATTERN (grep -E), W/DONE exists or WAIT_S seconds
# (default 540) have passed. A machine handed back between calls comes back bare: that is said at once (exit 3)
# rather than waited on.
await_lines() {
  [ -f "$1/log.txt" ] || { echo "nothing runs on this machine ($1/log.txt missing): it was handed back; start again"; exit 3; }
  local end=$(( $(date +%s) + ${WAIT_S:-540} ))
  while [ "$(grep -cE "$2" "$1/log.txt")" -lt "$3" ] && [ ! -f "$1/DONE" ] && [ "$(date +%s)" -lt "$end" ]; do
    sleep 5
  done
}

# follow W PATTERN [LINES]: wait until the work is done (W/DONE) or WAIT_S have passed, then print the last LINES
# (default 60) log lines matching PATTERN and, once done, the exit code.
follow() {
  await_lines "$1" "$2" 1000000000
  grep -E "$2" "$1/log.txt" | cut -c1-300 | tail -"${3:-60}"
  if [ -f "$1/DONE" ]; then echo "exit code $(cat "$1/DONE")"; fi
}

# until_lines W PATTERN N: the same wait, ended as well by the N-th matching line, then the matching lines: a call
# can end as soon as the step it waits for has ended, with later steps still running detached (the device time a
# call holds is what counts).
until_lines() {
  await_lines "$1" "$2" "$3"
  grep -E "$2" "$1/log.txt" | cut -c1-300
}

# pack W NAME: W's small files (no weights, checkpoints, caches, tokenizers, models) as $OUT/NAME.tgz.
pack() {
  tar czf "$OUT/$2.tgz" -C "$1" --exclude='*.safetensors' --exclude='*.pt' --exclude=checkpoints --exclude=cache \
    --exclude=tokenizer --exclude=trainer --exclude='*.gguf' --exclude=data . 2>/dev/null
}
