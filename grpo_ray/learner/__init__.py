"""Runs in the learner actor (`worker.LearnerWorker`): the base model with its LoRA adapter
(QLoRA on a GPU), the GRPO update over token-budget micro-batches, the forward passes it
stands on (`passes`), the memory-light log-probabilities (`logprobs.token_logprobs`), checkpoint
state and the adapter's export (`sync.sender`). Nothing heavy is imported here: the driver
imports `worker` only where it places the actor."""
