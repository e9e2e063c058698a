"""Config names to reward functions: a built-in (in the mode `reward.mode` says) or an import path
`package.module:function`, each with the config's `kwargs` bound, under a unique name.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from grpo_ray.config import BUILTIN_REWARDS, ConfigError, RewardFunctionConfig
from grpo_ray.reward.functions import (RewardFn, correctness_reward, integer_reward,
                                       overlong_penalty, parity_correctness_reward,
                                       parity_integer_reward, parity_soft_format_reward,
                                       parity_strict_format_reward, parity_xml_count_reward,
                                       soft_format_reward, strict_format_reward,
                                       xml_count_reward)

MODES = ("fixed", "seed-parity")
BUILTIN = set(BUILTIN_REWARDS)

_FUNCTIONS: dict[str, dict[str, RewardFn]] = {
    "seed-parity": {"correctness": parity_correctness_reward, "integer": parity_integer_reward,
                    "strict_format": parity_strict_format_reward,
                    "soft_format": parity_soft_format_reward,
                    "xml_count": parity_xml_count_reward},
    "fixed": {"correctness": correctness_reward, "integer": integer_reward,
              "strict_format": strict_format_reward, "soft_format": soft_format_reward,
              "xml_count": xml_count_reward},
}


def _builtin(mode: str, name: str) -> RewardFn:
    from grpo_ray.reward.math import math_reward  # it builds on this module's helpers

    both: dict[str, RewardFn] = {"math": math_reward, "overlong": overlong_penalty}
    return {**_FUNCTIONS[mode], **both}[name]


class _Bound:
    """A reward function with the config's `kwargs` bound; they win over dataset columns of the
    same name, so what the config says is what the function gets."""

    def __init__(self, fn: RewardFn, kwargs: dict[str, Any]):
        self.fn, self.kwargs = fn, dict(kwargs)
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, *args: Any, **columns: Any) -> list:
        return self.fn(*args, **{**columns, **self.kwargs})


def _check_kwargs(fn: RewardFn, kwargs: dict[str, Any], path: str, key: str) -> None:
    """A function without `**kwargs` must name every bound argument (built-ins are checked by
    the config, which knows their arguments)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin or C function)
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise ConfigError(f"{key}: {path!r} has no argument(s) {', '.join(unknown)} (its "
                          f"arguments: {', '.join(params)})")


def _import(path: str, key: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: {path!r} is neither a built-in reward "
                          f"({', '.join(sorted(BUILTIN))}) nor an import path "
                          "'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {path!r} ({e})") from None
    except Exception as e:  # the module itself fails while loading
        raise ConfigError(f"{key}: cannot import {path!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {path!r} is not callable (got {type(fn).__name__})")
    return fn


def get_reward_functions(names_and_weights: list[RewardFunctionConfig],
                         mode: str) -> list[tuple[str, RewardFn, float]]:
    """(unique name, function, weight) per configured reward, in config order.

    A built-in keeps its config name; an imported function is named by its `__name__`; a name
    seen before gets a suffix (`_2`, `_3`, ...), so every column of scores is distinct. A
    config's `kwargs` are bound to its function."""
    if mode not in MODES:
        raise ConfigError(f"reward.mode: must be one of {list(MODES)} (got {mode!r})")
    out: list[tuple[str, RewardFn, float]] = []
    seen: set[str] = set()
    for i, cfg in enumerate(names_and_weights):
        if cfg.name in BUILTIN:
            name, fn = cfg.name, _builtin(mode, cfg.name)
        else:
            fn = _import(cfg.name, f"reward.functions[{i}]")
            name = getattr(fn, "__name__", cfg.name.partition(":")[2])
            _check_kwargs(fn, cfg.kwargs, cfg.name, f"reward.functions[{i}].kwargs")
        if cfg.kwargs:
            fn = _Bound(fn, cfg.kwargs)
        unique, k = name, 2
        while unique in seen:
            unique, k = f"{name}_{k}", k + 1
        seen.add(unique)
        out.append((unique, fn, float(cfg.weight)))
    return out
