"""Which learner backend runs, and the reason the start-up line gives."""
import importlib.util

import torch

from grpo_ray.learner.model import choose_backend


def test_auto_takes_unsloth_only_where_it_can_run(monkeypatch):
    assert choose_backend("auto", torch.device("cpu")) == ("peft", "learner.backend=auto, no CUDA")
    assert choose_backend("peft", torch.device("cuda")) == ("peft", "learner.backend=peft")
    assert choose_backend("unsloth", torch.device("cpu"))[0] == "unsloth"  # asked for: tried
    real = importlib.util.find_spec
    for installed, expected in [(False, ("peft", "learner.backend=auto, unsloth is not "
                                                 "installed")),
                                (True, ("unsloth", "learner.backend=auto, unsloth is installed"))]:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name: (installed or None) if name == "unsloth" else real(name))
        assert choose_backend("auto", torch.device("cuda")) == expected
