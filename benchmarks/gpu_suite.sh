#!/usr/bin/env bash
# The GPU tests and the GPU figures of docs/benchmarks.md, from a machine with one CUDA GPU and
# the `gpu` extra (vLLM 0.26, bitsandbytes, Ray; Unsloth for the unsloth parts) installed.
# Parts run in the order given, e.g.
#   bash benchmarks/gpu_suite.sh setup tests step-peft step-unsloth-merged learn rollout
# setup: GPU, memory and versions into env.txt, and the model (random weights of Qwen2.5-3B's
# shape) built at $MODEL (default /tmp/q3b) unless it is there. Logs and JSON go to $SUITE
# (default outputs/gpu-suite); each part has a time limit and the next part runs regardless.
# learn-<learner>[-merged]: 200 steps of configs/learn-gpu.yaml (rollout.merge_adapter with
# -merged), checked (benchmarks/reliability_gpu.py);
# multi-engine, faults: an engine killed beside another on the GPU; sync faults injected.
# step-<learner>[-merged][-compare]: benchmarks/grpo_step.py with learner.backend=<learner>
# (peft or unsloth), rollout.merge_adapter when -merged, and with -compare $STEPS more steps one
# step off policy on the same actors (algorithm.max_staleness=1, importance sampling on in both).
# With -kernels (not with -compare), $STEPS more on-policy steps with the other learner.loss_kernel
# (chunked <-> liger) on the same actors: both kernels' update times side by side.
# table: issue 20's table (every figure beside its goal) from the JSON this run wrote, and the
# GPU's clocks, power and load during each part, into $SUITE/table.md; run it last.
# $STEP_OVERRIDES (section.key=value ...) go to every step-* part, e.g. rollout.kv_cache_gb=41,
# and $STEP_TAG (e.g. -nockpt) to its file names: the table lists such runs as variants. With
# $PROFILE set, each step-* part runs its last on-policy step under the torch profiler
# (the learner's ops by GPU time into $SUITE/<part>.profile.txt).
# $TESTS_K selects the tests part's tests (pytest -k); $LEARN_OVERRIDES go to the learn parts.
# learner-ab: the learner's update alone, A/B: per-step settings switched on one loaded learner,
# load-time ones on a fresh learner each.
# mps-compare: step-unsloth-merged-compare under an MPS server (where the machine has one).
# issue20, issue30: the parts above in the order a lease of that issue runs them.
# peer-trl: TRL's GRPOTrainer with vLLM colocated at the same shape and settings, $STEPS steps
# (benchmarks/trl_peer.py): the step time ours is compared with.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:$PWD/benchmarks:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SUITE=${SUITE:-outputs/gpu-suite}
MODEL=${MODEL:-/tmp/q3b}
STEPS=${STEPS:-4}
mkdir -p "$SUITE"

# What nvidia-smi samples every 200 ms while a part runs, into $SUITE/NAME.gpu.csv: whether a slow
# phase had the GPU's clocks down (power, heat: the reasons) or the GPU idle (the host behind).
GPU_QUERY=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,memory.used
if nvidia-smi --query-gpu=clocks_event_reasons.active --format=csv >/dev/null 2>&1; then
  GPU_QUERY+=,clocks_event_reasons.active
fi

run() {  # run NAME SECONDS COMMAND...: log to $SUITE/NAME.log, print its exit code and tail
  local name=$1 limit=$2 start=$SECONDS rc monitor=""
  shift 2
  echo "=== $name: $*"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu="$GPU_QUERY" --format=csv -lms 200 >"$SUITE/$name.gpu.csv" 2>&1 &
    monitor=$!
  fi
  timeout "$limit" "$@" >"$SUITE/$name.log" 2>&1
  rc=$?
  [ -n "$monitor" ] && kill "$monitor" 2>/dev/null
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  grep -v -e "WARNING" -e "INFO" -e "it/s]" -e "pid=" "$SUITE/$name.log" | tail -n "${TAIL:-25}"
}

for part in "$@"; do
  case $part in
    setup)
      { date -u; nvidia-smi; df -h /dev/shm /tmp; nproc; free -g
        python3 -c "import torch, vllm, ray, transformers, peft, bitsandbytes, trl
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'vllm', vllm.__version__,
      'ray', ray.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'bitsandbytes', bitsandbytes.__version__, 'trl', trl.__version__)"; } >"$SUITE/env.txt" 2>&1
      tail -n 4 "$SUITE/env.txt"
      run build 300 python3 -c "from common import ensure_model; ensure_model('$MODEL')";;
    tests)
      TAIL=40 run tests "${TESTS_LIMIT:-480}" python3 -m pytest -m gpu tests/gpu \
        tests/sync/test_digest.py -s -rA \
        -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"};;
    step-*)
      label=${part#step-}
      backend=${label%%-*}
      extra=()
      [[ $label == *merged* ]] && extra+=(rollout.merge_adapter=true)
      overlap=0
      [[ $label == *compare* ]] && { overlap=$STEPS; extra+=(algorithm.importance_sampling_correction=true); }
      kernels=()
      [[ $label == *kernels* ]] && kernels=(--compare-loss-kernel)
      run "$part${STEP_TAG:-}" "${STEP_LIMIT:-330}" python3 benchmarks/grpo_step.py --model "$MODEL" \
        --steps "$STEPS" --overlap-steps "$overlap" --sync-repeats "${SYNC_REPEATS:-3}" \
        "${kernels[@]}" --json "$SUITE/$part${STEP_TAG:-}.json" "learner.backend=$backend" \
        "${extra[@]}" ${PROFILE:+--profile "$SUITE/$part${STEP_TAG:-}.profile.txt"} \
        ${STEP_OVERRIDES:-};;
    learner-ab)  # the learner's update alone (benchmarks/learner_step.py), a fresh learner for
      # each load-time variant. bnb + PEFT: as configured (its unquantized weights in bf16), with
      # Liger's fused loss, and with PEFT's fp32 upcast (the default before 2026-12-04).
      # Unsloth: with and without checkpointing. (2026-12-04: cast_lm_head_to_fp32 null vs
      # false, checkpointing off at 16384 and 8192, upcast true vs false: docs/benchmarks.md.)
      run learner-ab-peft "${AB_LIMIT:-300}" python3 benchmarks/learner_step.py \
        --model "$MODEL" --json "$SUITE/learner-ab-peft.json" \
        --variant learner.upcast_unquantized_to_fp32=false \
        --variant learner.loss_kernel=liger \
        --variant learner.upcast_unquantized_to_fp32=true \
        learner.backend=peft
      # Unsloth's peak at two micro-batch sizes without checkpointing: what memory a rule that
      # turns checkpointing off where it fits must leave for it
      run learner-ab-unsloth "${AB_LIMIT:-360}" python3 benchmarks/learner_step.py \
        --model "$MODEL" --json "$SUITE/learner-ab-unsloth.json" \
        --variant learner.gradient_checkpointing=true \
        --variant learner.gradient_checkpointing=false \
        --variant "learner.gradient_checkpointing=false learner.max_tokens_per_micro_batch=8192" \
        learner.backend=unsloth;;
    peer-trl)  # TRL's GRPOTrainer, vLLM colocated, bf16 LoRA: the same shape and $STEPS steps
      run peer-trl "${PEER_LIMIT:-540}" python3 benchmarks/trl_peer.py --model "$MODEL" \
        --steps "$STEPS" --json "$SUITE/peer-trl.json";;
    table)  # issue 20's one table from this run's JSON (benchmarks/suite_table.py)
      python3 benchmarks/suite_table.py "$SUITE" --out "$SUITE/table.md";;
    learn-peft|learn-unsloth|learn-peft-merged|learn-unsloth-merged)  # 200 steps of
      # configs/learn-gpu.yaml, its own settings (-merged: rollout.merge_adapter)
      label=${part#learn-}
      merged=()
      [[ $label == *-merged ]] && merged=(rollout.merge_adapter=true)
      TAIL=12 run "$part" "${LEARN_LIMIT:-900}" python3 scripts/learning_benchmark.py \
        --config configs/learn-gpu.yaml --eval-every 50 "output.dir=$SUITE/$part" \
        "algorithm.total_steps=${LEARN_STEPS:-200}" "learner.backend=${label%-merged}" \
        "${merged[@]}" ${LEARN_OVERRIDES:-}
      # fails unless held-out accuracy rose by 0.3 and no engine was replaced or repaired
      run "$part-check" 60 python3 benchmarks/reliability_gpu.py learn-check "$SUITE/$part" \
        --json "$SUITE/reliability.jsonl";;
    learn)
      bash "$0" learn-peft learn-unsloth;;
    mps-compare)  # step-unsloth-merged-compare under an MPS server, whose clients share the SMs
      # instead of time-slicing the GPU (one step off, generation runs beside the update); the
      # server is a user process, changes no setting of the GPU, and is stopped after
      if ! command -v nvidia-cuda-mps-control >/dev/null; then
        echo "=== mps-compare: no nvidia-cuda-mps-control on this machine"; continue
      fi
      export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
      nvidia-cuda-mps-control -d && STEP_TAG=-mps bash "$0" step-unsloth-merged-compare
      echo quit | nvidia-cuda-mps-control
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY;;
    issue20)  # the next lease's plan for issue 20, its parts in order of value (a cut lease
      # keeps the first); the table after each from learner-ab on (about 2,300 s in all)
      TESTS_K="digest or deferred or (receives_the_learners_adapter and merged)" \
        bash "$0" setup tests
      bash "$0" learner-ab table step-peft-merged table step-unsloth-merged table
      # the merged rollout has not yet run a learning run: it must learn before a config
      # turns it on (learn-peft, LoRA rollout, 120 steps: 0.19 -> 0.61-0.65 in three leases)
      LEARN_STEPS=120 bash "$0" learn-unsloth-merged
      ROLLOUT_ARGS="--modes plain-base,actor-merged --shapes 16x8x256" bash "$0" rollout table
      bash "$0" step-unsloth-merged-compare table peer-trl table mps-compare table;;
    issue30)  # issue 30's lease, its parts in order of value (a cut lease keeps the first):
      # the headline step on and one step off (profiled), the merged rollout's learning run,
      # TRL's peer, the lighter learner with the KV cache given (start-up), the bnb row, the
      # GPU tests not yet run there, MPS; the table after each
      PROFILE=1 STEPS=${STEPS_MAIN:-5} bash "$0" setup step-unsloth-merged-compare table
      LEARN_STEPS=120 bash "$0" learn-unsloth-merged
      bash "$0" peer-trl table
      STEP_TAG=-nockpt STEP_OVERRIDES="learner.gradient_checkpointing=false rollout.kv_cache_gb=8" \
        bash "$0" step-unsloth-merged-compare table
      bash "$0" step-peft-merged table
      TESTS_K="digest or deferred" bash "$0" tests
      bash "$0" mps-compare table;;
    multi-engine|faults)  # benchmarks/reliability_gpu.py: an engine killed; sync faults injected
      run "$part" "${FAULTS_LIMIT:-600}" python3 benchmarks/reliability_gpu.py "$part" "output.dir=$SUITE/$part" \
        --json "$SUITE/reliability.jsonl";;
    rollout)
      run rollout "${ROLLOUT_LIMIT:-540}" python3 benchmarks/rollout_throughput.py \
        --model "$MODEL" --json "$SUITE/rollout.json" ${ROLLOUT_ARGS:-};;
    *) echo "unknown part $part (setup, tests, step-*, learner-ab, peer-trl, rollout, table, learn[-peft|-unsloth][-merged], multi-engine, faults, mps-compare, issue20, issue30)"; exit 2;;
  esac
done
