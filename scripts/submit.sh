#!/usr/bin/env bash
# Submit grpo-ray's reference recipe to a Ray cluster as a Ray job, follow its logs, and exit
# non-zero unless the job succeeds. `scripts/submit.sh --help` says how.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: scripts/submit.sh [ADDRESS] [section.key=value ...]

Submits `grpo-ray train --config $CONFIG cluster.use_gpu=true output.dir=... [overrides]` to a
Ray cluster with `ray job submit`, uploading this checkout as the job's working directory with
deploy/runtime_env.yaml, prints the job id, follows the job's logs until it ends, and exits 0
only if it succeeded (1 if it failed or was stopped).

  ADDRESS     the cluster's job server (its dashboard), e.g. http://HEAD:8265; default
              $RAY_ADDRESS. For a `ray up deploy/ray-cluster.yaml` cluster, keep
              `ray dashboard deploy/ray-cluster.yaml` running and use http://localhost:8265.
  overrides   dotted config overrides, applied after the config file, e.g.
              rollout.num_engines=3 rollout.prompts_per_step=15 algorithm.total_steps=50

The driver runs on the head node and writes the run there, under
$OUTPUT_ROOT/<job id> (pass output.dir=/abs/path to choose another place, such as shared
storage). Fetch it from a `ray up` cluster with
  ray rsync-down deploy/ray-cluster.yaml '~/grpo-ray-runs/<job id>' outputs/<job id>
A run whose driver died resumes when submitted again with the same config and
output.dir=<that run's directory> (no --resume needed; another config is refused).

Environment:
  RAY_ADDRESS          job server address, when ADDRESS is not given
  RAY_AUTH_TOKEN       the cluster's authentication token. Ray 2.60 clusters started with
                       RAY_AUTH_MODE=token (deploy/ray-cluster.yaml's, KubeRay's authOptions)
                       refuse jobs without it. Also read from RAY_AUTH_TOKEN_PATH or
                       ~/.ray/auth_token (`ray get-auth-token` prints yours). When one is present
                       and RAY_AUTH_MODE is unset, this script sets RAY_AUTH_MODE=token so that
                       the Ray CLI sends it.
  CONFIG               config file, relative to the repository (configs/qwen2.5-3b-gsm8k.yaml)
  OUTPUT_ROOT          head-node directory of runs ('$HOME/grpo-ray-runs', expanded there)
  SUBMISSION_ID        the job id (default grpo-ray-<UTC time>-<random>)
  DRY_RUN=1            print the entrypoint and the `ray job submit` command, submit nothing
EOF
}

die() { echo "submit.sh: $*" >&2; exit 2; }

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac

# The first argument is the address unless it is an override (section.key=value).
address="${RAY_ADDRESS:-}"
if [[ $# -gt 0 && "$1" != *=* ]]; then
  address="$1"
  shift
fi
[[ -n "$address" ]] || die "no cluster address: pass it (e.g. http://HEAD:8265) or set RAY_ADDRESS; see --help"

config="${CONFIG:-configs/qwen2.5-3b-gsm8k.yaml}"
[[ -f "$ROOT/$config" ]] || die "$config: no such config file under $ROOT"
output_root="${OUTPUT_ROOT:-\$HOME/grpo-ray-runs}"
job_id="${SUBMISSION_ID:-grpo-ray-$(date -u +%Y%m%d-%H%M%S)-$RANDOM}"

if [[ -z "${RAY_AUTH_MODE:-}" ]] &&
   [[ -n "${RAY_AUTH_TOKEN:-}" || -n "${RAY_AUTH_TOKEN_PATH:-}" || -f "$HOME/.ray/auth_token" ]]; then
  export RAY_AUTH_MODE=token
fi

# The entrypoint runs through `bash -c` on the head node so that $HOME in output.dir expands
# there; the user's overrides come last, so an output.dir of theirs wins.
entrypoint="grpo-ray train --config $(printf '%q' "$config") cluster.use_gpu=true"
entrypoint+=" output.dir=\"$output_root/$job_id\""
for override in "$@"; do
  [[ "$override" == *=* ]] || die "$override: an override must look like section.key=value"
  entrypoint+=" $(printf '%q' "$override")"
done

submit=(ray job submit --address "$address" --submission-id "$job_id" --no-wait
        --runtime-env "$ROOT/deploy/runtime_env.yaml" --working-dir "$ROOT"
        -- bash -c "$entrypoint")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "job id: $job_id"
  echo "entrypoint: $entrypoint"
  echo "command: $(printf '%q ' "${submit[@]}")"
  exit 0
fi
command -v ray >/dev/null || die "the ray CLI is not installed here: pip install 'ray[default]==2.60.0'"

"${submit[@]}"
echo "job id: $job_id"

trap 'echo; echo "stopped following; the job keeps running. Stop it with:"; \
      echo "  ray job stop --address $address $job_id"; exit 130' INT
ray job logs --address "$address" --follow "$job_id"
trap - INT

# `ray job logs` exits 0 whatever the outcome: ask for the job's final status.
status="$(ray job status --log-color false --address "$address" "$job_id" 2>&1)" || true
if grep -q "Job '$job_id' succeeded" <<<"$status"; then
  echo "job $job_id succeeded; its run is on the head node under $output_root/$job_id" \
       "(unless you passed output.dir)"
  exit 0
fi
echo "job $job_id did not succeed: $(grep -m1 -oE "Job '$job_id' [a-z ]+|Status for job.*" <<<"$status")" >&2
exit 1
