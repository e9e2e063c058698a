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


_calls = {"n": 0}


def wrong_count_from_third_call(prompts, completions, **kwargs):
    """A user reward with a bug that shows from its worker's third call (step 3): one score too
    few (before that, `text_length`)."""
    _calls["n"] += 1
    scores = text_length(prompts, completions)
    return scores[:-1] if _calls["n"] >= 3 else scores
