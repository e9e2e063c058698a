"""A reward that a model with random weights earns, so that benchmark steps do real work (non-zero
advantages, an update that moves the adapter). Imported by path on the reward actors
(`reward.functions=[{name: 'rewards_bench:sevens'}]`, benchmarks/ on PYTHONPATH)."""


def sevens(prompts, completions, **kwargs):
    """How often the digit 7 occurs in the completion's text, / 10: random text varies in it."""
    return [c[0]["content"].count("7") / 10 for c in completions]
