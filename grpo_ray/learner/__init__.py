"""The learner actor (`worker.LearnerWorker`: LoRA policy, GRPO update, adapter export) and the
memory-light log-probabilities it computes (`logprobs.token_logprobs`). Nothing heavy is imported
here: the driver imports `worker` only when it places the actor."""
