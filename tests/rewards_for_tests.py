"""User rewards, imported by path on the reward actors (tests/ is on their PYTHONPATH)."""


def text_length(prompts, completions, **kwargs):
    """Longer completions score higher: a signal even a random model's samples differ in."""
    return [len(c[0]["content"]) / 100 for c in completions]


def nan_reward(prompts, completions, **kwargs):
    """A broken user reward: NaN for every row (what used to "train" silently)."""
    return [float("nan")] * len(completions)


def length_unless_subtraction(prompts, completions, question, **kwargs):
    """Length as `text_length`, except for subtraction problems ("gives away"), which all score
    1.0: their groups have zero variance, what dynamic sampling drops."""
    return [1.0 if "gives away" in q else len(c[0]["content"]) / 100
            for q, c in zip(question, completions)]
