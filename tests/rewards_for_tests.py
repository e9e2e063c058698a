"""User rewards, imported by path on the reward actors (tests/ is on their PYTHONPATH)."""


def text_length(prompts, completions, **kwargs):
    """Longer completions score higher: a signal even a random model's samples differ in."""
    return [len(c[0]["content"]) / 100 for c in completions]


def nan_reward(prompts, completions, **kwargs):
    """A broken user reward: NaN for every row (what used to "train" silently)."""
    return [float("nan")] * len(completions)
