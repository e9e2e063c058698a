"""`model.path` to a directory that transformers and vLLM load: a local directory or a Hub id as
given, or a built-in tiny model built in code (`builtin:tiny`, `builtin:tiny-warm`) once per
settings in the cache directory, so that runs with the same settings reuse it.

The cache is `$GRPO_RAY_CACHE`, else `$XDG_CACHE_HOME/grpo-ray`, else `~/.cache/grpo-ray`: never
the run's output directory, which a bad config must leave untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from grpo_ray.config import Config, UserError

BUILTINS = ("builtin:tiny", "builtin:tiny-warm")


def cache_dir() -> Path:
    if os.environ.get("GRPO_RAY_CACHE"):
        return Path(os.environ["GRPO_RAY_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "grpo-ray"


def resolve_model_path(cfg: Config) -> str:
    """The directory (or Hub id) of `model.path`, building a built-in model if needed.

    A path that is neither a directory, a built-in nor a Hub model raises UserError in one line
    (the tokenizer is loaded to find out: that is where a wrong path shows)."""
    path = cfg.model.path
    if path == "builtin:tiny":
        return str(tiny_model(cfg.algorithm.seed))
    if path == "builtin:tiny-warm":
        return str(warm_tiny_model(cfg))
    if path.startswith("builtin:"):
        raise UserError(f"model.path={path}: unknown built-in model (known: {', '.join(BUILTINS)})")
    problem = local_model_problem(path) or hub_model_problem(path)
    if problem:  # found in a second, before transformers' lookups and retries
        raise UserError(f"model.path={path}: {problem}")
    from grpo_ray.driver.data.prompts import load_tokenizer

    try:
        load_tokenizer(path)
    except (OSError, ValueError) as e:  # an unknown Hub id, a Hub that does not answer
        raise UserError(f"model.path={path}: not a local directory, and the Hugging Face Hub has "
                        f"no such model or is unreachable ({_first_line(e)})") from None
    return path


def local_model_problem(path: str) -> str | None:
    """What is wrong with `path` as a model, as far as the file system and the Hub's naming rule
    tell at once; None for a model directory or a well-formed Hub id (`org/name`, `name`)."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            return (f"the directory {local} has no config.json (not a transformers model "
                    "directory: save_pretrained writes one)")
        return None
    if local.exists():
        return f"{local} is a file; a model is a directory (with config.json) or a Hub id"
    if path.startswith((".", "/", "~")) or os.sep + os.sep in path:
        return "no such directory"
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return "not a local directory, nor a Hugging Face Hub id (org/name)"
    return None


def hub_model_problem(path: str) -> str | None:
    """For a Hub id neither on disk nor in the Hub cache: one request to the Hub (10 s at most)
    says whether the model exists; None when it does, when the cache has it, offline, or when
    the Hub answers something else (a gated model: transformers says what it needs)."""
    if Path(path).expanduser().is_dir() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return None
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.utils import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return None
    try:
        HfApi().model_info(path, timeout=10)
    except RepositoryNotFoundError:
        return "not a local directory, nor a model on the Hugging Face Hub (no such repository)"
    except Exception as e:
        # no connection (httpx's TransportError, an OSError): said now, not after retries;
        # gated, private, rate-limited: transformers says what it needs
        if isinstance(e, OSError) or any(c.__name__ == "TransportError"
                                         for c in type(e).__mro__):
            return (f"not a local directory, and the Hugging Face Hub is unreachable "
                    f"({type(e).__name__}); HF_HUB_OFFLINE=1 uses the cache only")
        return None
    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def tiny_model(seed: int) -> Path:
    """The tiny random-weight model and tokenizer of `driver.models.tiny`, built once per seed."""
    from grpo_ray.driver.models.tiny import save_tiny

    return _cached({"model": "tiny", "seed": seed}, lambda out: save_tiny(out, seed=seed))


def warm_tiny_model(cfg: Config) -> Path:
    """The tiny model (seed `algorithm.seed`) after `sft_warmup` with `BENCHMARK_WARMUP` on the
    synthetic train rows: it writes the XML format with low correctness (about a minute on 2
    CPU cores, once per settings)."""
    from grpo_ray.driver.data.dataset import load_rows
    from grpo_ray.driver.models.warmup import BENCHMARK_WARMUP, warm_up

    d = cfg.data
    threads = 2  # fixed: the same float sums, hence the same model, whatever the core count
    settings = dict(BENCHMARK_WARMUP, model="tiny-warm", seed=cfg.algorithm.seed,
                    system_prompt=d.system_prompt, threads=threads,
                    rows=[d.num_synthetic, d.seed, d.synthetic_max_value])

    def build(out: Path) -> None:
        # a minute of silence otherwise: say what happens, once, and how long it takes (a bar
        # follows on a terminal)
        print(f"model.path=builtin:tiny-warm: building it once (supervised warm-up of the tiny "
              f"model, {BENCHMARK_WARMUP['steps']} steps, about a minute on 2 CPU cores); cached "
              f"in {cache_dir()}", flush=True)
        base = tiny_model(cfg.algorithm.seed)
        warm_up(str(base), str(out), load_rows(d), seed=cfg.algorithm.seed,
                system_prompt=d.system_prompt, threads=threads)

    return _cached(settings, build)


def _cached(settings: dict[str, Any], build: Callable[[Path], Any]) -> Path:
    """`<cache>/<model>-<hash of settings>`, built by `build(dir)` into a temporary sibling that
    is renamed into place: a half-built model is never found, and concurrent builders agree."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"{settings['model']}-{key}"
    if (path / "config.json").exists():
        return path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-") as tmp:
        build(Path(tmp) / "model")
        if not (path / "config.json").exists():  # another process may have finished first
            os.replace(Path(tmp) / "model", path)
    return path.resolve()
