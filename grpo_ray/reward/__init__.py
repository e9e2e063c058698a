"""Runs in a reward worker actor (`worker.RewardWorker`): the reward functions with TRL's
signature, the reference recipe's (`functions`), the `math` correctness reward (`math`,
math-verify in pebble's process pool) and TRL's by name (`registry`; TRL is imported only when
one is asked for). The functions are pure, so the driver also runs them to judge evaluation
answers; the driver's pool of these workers is `cluster.rewards`."""
