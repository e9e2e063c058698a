"""Runs in the driver process (the `grpo-ray` command, or the job's entrypoint under `ray job
submit`): the training loop (`trainer`), rollouts in flight (`rollouts`), evaluation, checkpoints,
export, metrics and tracking, the TRL config reader, and what the driver prepares before any actor
starts (`data`, `models`). It holds no model weights during training: it moves token ids,
rewards and advantages between the actors."""
