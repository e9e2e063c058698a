"""Runs in the driver: its handles of the remote actors. `connect` joins (or starts) the Ray
cluster; `placement` reserves their resources and starts them; `group.ActorGroup` is the one
place that waits on an actor's call, with a deadline, and replaces a lost or hung member (its
decisions in `health`, pure code); `engines.EngineGroup` splits generation over the rollout
engines; `rewards.RewardPool` shards scoring over the reward workers. The actors' own code lives
in rollout/, reward/, learner/."""
