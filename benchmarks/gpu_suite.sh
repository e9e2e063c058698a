#!/usr/bin/env bash
# The GPU tests and every GPU figure of docs/benchmarks.md, from a machine with one CUDA GPU and
# the `gpu` extra (vLLM 0.26, bitsandbytes, Ray) installed. Parts run in the order given:
#   bash benchmarks/gpu_suite.sh setup tests step cli rollout
# setup: GPU, memory and versions into env.txt, and the model (random weights of Qwen2.5-3B's
# shape) built at $MODEL (default /tmp/q3b) unless it is there. Logs and JSON go to $OUT
# (default outputs/gpu-suite); each part has a time limit and the next part runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-outputs/gpu-suite}
MODEL=${MODEL:-/tmp/q3b}
mkdir -p "$OUT"

run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.log, print its exit code and tail
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  grep -v -e "WARNING" -e "INFO" -e "it/s]" "$OUT/$name.log" | tail -n "${TAIL:-25}"
}

for part in "$@"; do
  case $part in
    setup)
      { date -u; nvidia-smi; df -h /dev/shm /tmp; nproc; free -g
        python3 -c "import torch, vllm, ray, transformers, peft, bitsandbytes, trl
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'vllm', vllm.__version__,
      'ray', ray.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'bitsandbytes', bitsandbytes.__version__, 'trl', trl.__version__)"; } >"$OUT/env.txt" 2>&1
      tail -n 4 "$OUT/env.txt"
      run build 300 python3 -c "import sys; sys.path.insert(0, 'benchmarks')
from common import ensure_model; ensure_model('$MODEL'); print('model at $MODEL')";;
    tests)
      TAIL=40 run tests "${TESTS_LIMIT:-420}" python3 -m pytest -m gpu tests/gpu -s -rA -p no:cacheprovider;;
    step)
      run step "${STEP_LIMIT:-320}" python3 benchmarks/grpo_step.py --model "$MODEL" \
        --json "$OUT/step.json";;
    cli)
      run cli "${CLI_LIMIT:-240}" python3 -m grpo_ray train \
        --config configs/qwen2.5-3b-gsm8k-1gpu.yaml "model.path=$MODEL" data.source=synthetic \
        algorithm.total_steps=3 output.dir=/tmp/grpo-cli-run;;
    rollout)
      run rollout "${ROLLOUT_LIMIT:-540}" python3 benchmarks/rollout_throughput.py \
        --model "$MODEL" --json "$OUT/rollout.json" ${ROLLOUT_ARGS:-};;
    *) echo "unknown part $part (setup, tests, step, cli, rollout)"; exit 2;;
  esac
done
