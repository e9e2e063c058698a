"""`math`: correctness by mathematical equivalence, through Hugging Face's math-verify (the
library of TRL's `accuracy_reward`), for answers the GSM8K numeric rule calls wrong:
`\\frac{3}{4}` == `0.75` == `3/4`, `1e3` == `10^3` == `1000`, `x^2+2x+1` == `(x+1)^2`,
`[1,2)` intervals, `\\{1,2\\}` sets, `\\sqrt{2}/2` == `\\frac{1}{\\sqrt{2}}`.

- The answer is the text between the last `<answer>` and `</answer>` (the recipe's format) or,
  without those tags, the content of the completion's last `\\boxed{...}`; neither scores 0.
- 2.0 when the answer equals the gold (the scale of `correctness`, which it replaces), else 0.0;
  None when the gold is empty or math-verify cannot read it (the row is then not scored, as TRL
  does); a `FailedScore` when math-verify itself fails (below).
- Answers and golds are read as LaTeX only (math-verify's `LatexExtractionConfig`, inside a
  `\\boxed{}`), never as Python: math-verify's plain-expression reader (`ExprExtractionConfig`)
  hands the text to sympy's `parse_expr`, which calls `eval`, so it is not used. Scientific
  notation (`2.5e-3`) is rewritten as `2.5\\times 10^{-3}` first, since LaTeX reads `e` as
  Euler's number.
- Time limit: math-verify's own is `signal.alarm`, which works only in a main thread, and reward
  actors call functions from threads. So math-verify runs in the worker processes of a pebble
  `ProcessPool` (`MathVerifier`), which kills a worker whose comparison takes longer than
  `timeout_s` (SIGKILL after a 3 s SIGTERM grace: sympy can hold the GIL for minutes inside one
  big power such as `9^{9^{9^{9}}}`) and starts a fresh one. A comparison cut off scores 0.0
  (the answer that made it hang earns nothing); a gold answer cut off makes its rows None.

This module imports math-verify and pebble only when a row is scored.
"""
from __future__ import annotations

import atexit
import functools
import importlib.util
import multiprocessing
import os
import re
import threading
from typing import Any

from grpo_ray.answer_format import last_boxed
from grpo_ray.reward.functions import FailedScore, _gold, completion_texts, extract_answer

DEFAULT_TIMEOUT_S = 5.0
"""Longest one comparison (gold + answer parsed, then compared) may take (`kwargs.timeout_s`)."""
_WORKERS = 2
"""math-verify processes per process (each ~150 MB with sympy, started on the first row): a reward
actor scores one shard at a time, row by row; a second serves another thread meanwhile."""
_SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
_DELIMITERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))


def math_answer(text: str) -> str | None:
    """The completion's answer: its `<answer>` block, else its last `\\boxed{...}`, else None."""
    tagged = extract_answer(text)
    return tagged if tagged is not None else last_boxed(text)


def as_latex(text: str) -> str:
    """`text` as one boxed LaTeX expression for math-verify: the content of its last box, math
    delimiters (`$...$`, `\\(...\\)`, `\\[...\\]`) taken off, `1e3` written `1\\times 10^{3}`."""
    t = text.strip()
    inner = last_boxed(t)
    if inner is not None:
        t = inner
    for left, right in _DELIMITERS:
        if len(t) >= len(left) + len(right) and t.startswith(left) and t.endswith(right):
            t = t[len(left):len(t) - len(right)].strip()
            break
    t = _SCIENTIFIC.sub(lambda m: f"{m[1]}\\times 10^{{{m[2]}}}", t)
    return "\\boxed{" + t + "}"


def math_reward(prompts: list, completions: list, answer: list | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[float | None]:
    """2.0 when the answer is mathematically equal to the gold, 0.0 when not (or when there is
    no answer, or comparing it took longer than `timeout_s`), None when the gold is unreadable."""
    gold = _gold(answer, len(completions), "math")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"math: timeout_s must be > 0 (got {timeout_s!r})")
    texts = completion_texts(completions)
    golds = [None if g is None or not str(g).strip() else as_latex(str(g)) for g in gold]
    readable = {g: _VERIFIER.ask(g, None, timeout_s) for g in set(golds) - {None}}
    out: list[float | None] = []
    for text, g in zip(texts, golds):
        gold = None if g is None else readable[g]
        if gold is not None and "error" in gold:
            out.append(_failed(gold))
            continue
        if not (gold or {}).get("gold"):
            out.append(None)
            continue
        predicted = math_answer(text)
        if predicted is None or not predicted.strip():
            out.append(0.0)
            continue
        reply = _VERIFIER.ask(g, as_latex(predicted), timeout_s)
        if reply is not None and "error" in reply:
            out.append(_failed(reply))
            continue
        out.append(2.0 if reply is not None and reply.get("equal") else 0.0)
    return out


def _failed(reply: dict[str, Any]) -> FailedScore:
    """A row math-verify failed on: an error inside it is not a wrong answer, so not a 0."""
    return FailedScore(f"math-verify: {reply['error'][:200]}")


# ---- the worker processes ------------------------------------------------------------------------

def _worker_init(parent: int) -> None:
    """A pool worker's start: it dies with its parent, and math-verify is imported once."""
    _die_with_parent(parent)
    import logging

    for name in ("math_verify", "latex2sympy2_extended"):  # "timeout is disabled": we time out
        logging.getLogger(name).setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (~1 s with sympy: not inside the first row's time limit)


def _compare(gold: str, answer: str | None) -> dict[str, Any]:
    """In a worker: `{"gold": readable, "equal": equivalent}` (no `equal` without an answer),
    or `{"error": ...}` when math-verify raised."""
    from math_verify import verify

    try:
        parsed = _read(gold)
        reply: dict[str, Any] = {"gold": bool(parsed)}
        if parsed and answer is not None:
            # raise_on_error: else math-verify logs its own error and answers False
            reply["equal"] = bool(verify(parsed, _read(answer), timeout_seconds=None,
                                         raise_on_error=True))
    except Exception as e:  # the worker lives on; the row is a failed one
        reply = {"error": f"{type(e).__name__}: {e}"}
    return reply


@functools.lru_cache(maxsize=4096)
def _read(latex: str) -> Any:
    from math_verify import LatexExtractionConfig, parse

    return parse(latex, extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                 parsing_timeout=None, raise_on_error=True)


class MathVerifier:
    """A pebble `ProcessPool` of math-verify workers, shared by the threads of one process. A
    task that runs longer than its timeout has its worker killed (SIGTERM, SIGKILL 3 s later if
    sympy holds the GIL) and replaced; a worker that dies is replaced too."""

    def __init__(self) -> None:
        self._pool: Any = None
        self._lock = threading.Lock()

    def ask(self, gold: str, answer: str | None, timeout_s: float) -> dict[str, Any] | None:
        """`_compare`'s reply (`{"error": ...}` also when a worker died on the row twice); None
        when it took longer than `timeout_s`."""
        from concurrent.futures import TimeoutError as Timeout

        from pebble import ProcessExpired

        for _ in range(2):  # a worker killed by something else: one retry on a fresh one
            try:
                return self.pool().schedule(_compare, (gold, answer), timeout=timeout_s).result()
            except Timeout:
                return None
            except ProcessExpired as e:
                died = e
        return {"error": f"its process died on this row (exit code {died.exitcode})"}

    def pool(self) -> Any:
        with self._lock:
            if self._pool is None:
                if importlib.util.find_spec("math_verify") is None:
                    raise RuntimeError("math: math-verify is not installed "
                                       "(pip install math-verify==0.9.0)")
                from pebble import ProcessPool

                # spawn, not fork: reward actors run threads, which a fork would copy mid-state
                self._pool = ProcessPool(max_workers=_WORKERS,
                                         initializer=_worker_init, initargs=(os.getpid(),),
                                         context=multiprocessing.get_context("spawn"))
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join()


_VERIFIER = MathVerifier()
atexit.register(_VERIFIER.close)


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when the process that started it dies, even while it
    is stuck in a computation."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)  # the parent died before prctl took effect
