"""Config names to reward functions: a built-in (in the mode `reward.mode` says), one of TRL's
reward functions by short name (`trl:accuracy_reward`) or an import path `package.module:function`,
each with the config's `kwargs` bound, under a unique name.

TRL components: every function of `trl.rewards` (`trl:NAME`; a `get_*` factory is called with the
config's kwargs and its function is the reward), and `get_soft_overlong_punishment`, the built-in
`overlong`.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from grpo_ray.config import BUILTIN_REWARDS, TRL_PREFIX, ConfigError, RewardFunctionConfig
from grpo_ray.reward.functions import (RewardFn, correctness_reward, integer_reward,
                                       parity_correctness_reward, parity_integer_reward,
                                       parity_soft_format_reward, parity_strict_format_reward,
                                       parity_xml_count_reward, soft_format_reward,
                                       strict_format_reward, xml_count_reward)

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

    return {**_FUNCTIONS[mode], "math": math_reward}[name]


def _trl(name: str, key: str) -> RewardFn:
    """`trl:NAME`: the function (or `get_*` factory) NAME of `trl.rewards`."""
    import trl.rewards

    short = name[len(TRL_PREFIX):]
    fn = getattr(trl.rewards, short, None) if short in trl.rewards.__all__ else None
    if not callable(fn):
        known = [n for n in trl.rewards.__all__ if callable(getattr(trl.rewards, n))]
        raise ConfigError(f"{key}: trl.rewards has no reward function {short!r} (it has: "
                          f"{', '.join(sorted(known))})")
    return fn


def _make(factory: RewardFn, kwargs: dict[str, Any], name: str, key: str) -> RewardFn:
    """The reward that `factory` makes from the config's kwargs; a missing or unknown argument
    is the config's error."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        params = ", ".join(inspect.signature(factory).parameters)
        raise ConfigError(f"{key}: {name!r} {e} (its arguments: {params})") from None
    return factory(**kwargs)


class _Bound:
    """A reward function with the config's `kwargs` bound; they win over dataset columns of the
    same name, so what the config says is what the function gets."""

    def __init__(self, fn: RewardFn, kwargs: dict[str, Any]):
        self.fn, self.kwargs = fn, dict(kwargs)
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, *args: Any, **columns: Any) -> list:
        return self.fn(*args, **{**columns, **self.kwargs})


def _bind(fn: RewardFn, kwargs: dict[str, Any]) -> RewardFn:
    return _Bound(fn, kwargs) if kwargs else fn


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


def _resolve(cfg: RewardFunctionConfig, mode: str, key: str) -> tuple[str, RewardFn]:
    """(score column name, function with the config's kwargs applied) of one configured reward."""
    if cfg.name == "overlong":  # DAPO's soft overlong punishment, as TRL makes it
        from trl.rewards import get_soft_overlong_punishment

        return cfg.name, _make(get_soft_overlong_punishment, cfg.kwargs, cfg.name, f"{key}.kwargs")
    if cfg.name in BUILTIN:
        return cfg.name, _bind(_builtin(mode, cfg.name), cfg.kwargs)
    if cfg.name.startswith(TRL_PREFIX):
        fn = _trl(cfg.name, key)
        if fn.__name__.startswith("get_"):  # a factory: the kwargs make the reward function
            fn = _make(fn, cfg.kwargs, cfg.name, f"{key}.kwargs")
            return fn.__name__, fn
    else:
        fn = _import(cfg.name, key)
    _check_kwargs(fn, cfg.kwargs, cfg.name, f"{key}.kwargs")
    return getattr(fn, "__name__", cfg.name.partition(":")[2]), _bind(fn, cfg.kwargs)


def get_reward_functions(names_and_weights: list[RewardFunctionConfig],
                         mode: str) -> list[tuple[str, RewardFn, float]]:
    """(unique name, function, weight) per configured reward, in config order.

    A built-in keeps its config name; an imported or TRL function is named by its `__name__`
    (a factory's by its function's); a name seen before gets a suffix (`_2`, `_3`, ...), so every
    column of scores is distinct. A config's `kwargs` are bound to its function, or given to its
    factory (`overlong`, TRL's `get_*`)."""
    if mode not in MODES:
        raise ConfigError(f"reward.mode: must be one of {list(MODES)} (got {mode!r})")
    out: list[tuple[str, RewardFn, float]] = []
    seen: set[str] = set()
    for i, cfg in enumerate(names_and_weights):
        name, fn = _resolve(cfg, mode, f"reward.functions[{i}]")
        unique, k = name, 2
        while unique in seen:
            unique, k = f"{name}_{k}", k + 1
        seen.add(unique)
        out.append((unique, fn, float(cfg.weight)))
    return out
