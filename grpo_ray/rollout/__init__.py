"""Runs in a rollout engine actor (`worker.RolloutWorker`): one vLLM engine, sampling with the
newest LoRA adapter (or with it merged into its weights), scoring fixed completions for the sync
check. The adapter arrives through sync/ (`sync.receiver`, `sync.merged`). vLLM loads when a
RolloutWorker is built, not on import."""
