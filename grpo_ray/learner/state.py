"""What a resumed learner needs, as CPU tensors and plain Python values (loadable with
`torch.load(weights_only=True)`): the trainable LoRA parameters by name, optimizer and scheduler
state, and the torch / CUDA / `random` / numpy RNG states.

The learning-rate schedule is re-planned on load: a run resumed with a larger
`algorithm.total_steps` continues from its step on the schedule of the new total (warm-up and
decay over the new length), not at the end of the old one's.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def learner_state(model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    np_state = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype("int64")),
                     "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                     "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        rng["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    with torch.no_grad():
        lora = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                if p.requires_grad}
    return {"lora": lora, "optimizer": _to_cpu(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(), "rng": rng}


def load_learner_state(model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """Restore what `learner_state` returned; tensors go back to the parameters' devices. The
    scheduler keeps its own (possibly longer) plan and only takes the saved step."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state["lora"]))
    unexpected = sorted(set(state["lora"]) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint LoRA parameters do not match this learner's adapter "
                         f"(lora.target_modules changed?): {len(missing)} missing "
                         f"{missing[:1]}, {len(unexpected)} unexpected {unexpected[:1]}")
    for name, p in params.items():
        t = state["lora"][name]
        if t.shape != p.shape:
            raise ValueError(f"checkpoint LoRA parameter {name} has shape {tuple(t.shape)}, "
                             f"this learner's has {tuple(p.shape)} (lora.r changed?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["lora"][name].to(p.device, p.dtype))
    planned = list(scheduler.base_lrs)  # this run's learner.learning_rate
    # Optimizer.load_state_dict moves each state tensor to its parameter's device.
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # The saved optimizer holds the lr the OLD plan gave for the next step (0 once it ended):
    # the scheduler steps to the saved step again on this run's plan, which sets that step's lr
    # in the optimizer and in `get_last_lr()`.
    scheduler.base_lrs = planned
    for group, base in zip(optimizer.param_groups, planned):
        group["initial_lr"] = base
    scheduler.last_epoch -= 1
    scheduler.step()
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _to_cpu(value: Any) -> Any:
    """A copy of a nested dict/list/tuple with every tensor moved to the CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
