"""Rewards: the reference recipe's functions (`functions`, light) and the Ray actor pool that
runs them (`pool`, imports Ray: import it where the pool is built)."""
from grpo_ray.reward.functions import BUILTIN, MODES, get_reward_functions

__all__ = ["BUILTIN", "MODES", "get_reward_functions"]
