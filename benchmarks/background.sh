#!/usr/bin/env bash
# The GPU suite on a machine reached by remote calls of limited length (a leased GPU whose calls
# last at most 10 minutes, a CI step with a time limit): start it in the background in one call,
# then follow it with calls that each wait a while and bring the results back.
#   bash benchmarks/background.sh start NAME 'COMMAND'  # e.g. 'bash benchmarks/gpu_suite.sh issue20'
#   bash benchmarks/background.sh poll NAME [SECONDS]   # wait up to SECONDS (default 540) for it
# `poll` prints the command's last lines and whether it still runs, and packs $SUITE (logs, JSON,
# tables, nvidia-smi samples; no weights) into $OUT/NAME.tgz where $OUT is set. The command's
# output goes to $SUITE/NAME.out; it keeps running between calls for as long as the machine does.
set -uo pipefail
cd "$(dirname "$0")/.."
export SUITE=${SUITE:-$PWD/outputs/gpu-suite}
mkdir -p "$SUITE"
name=${2:?usage: background.sh start NAME COMMAND | poll NAME [SECONDS]}
case $1 in
  start)
    nohup setsid bash -c "${3:?start needs the command}" >"$SUITE/$name.out" 2>&1 </dev/null &
    echo $! >"$SUITE/$name.pid"
    echo "started $name (pid $!): $3";;
  poll)
    pid=$(cat "$SUITE/$name.pid")
    deadline=$((SECONDS + ${3:-540}))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 5; done
    grep -e "^=== " "$SUITE/$name.out" | tail -n 40
    if kill -0 "$pid" 2>/dev/null; then echo "$name: still running"; else echo "$name: ended"; fi
    if [ -n "${OUT:-}" ]; then
      tar czf "$OUT/$name.tgz" -C "$(dirname "$SUITE")" --exclude='*.safetensors' \
        --exclude='*.pt' --exclude='*.bin' --exclude='checkpoint*' "$(basename "$SUITE")"
    fi;;
  *) echo "usage: background.sh start NAME COMMAND | poll NAME [SECONDS]"; exit 2;;
esac
