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
  actors call functions from threads. So math-verify runs in a child process (`child_main`) that
  answers one comparison at a time; one that takes longer than `timeout_s` is killed (SIGKILL:
  sympy can hold the GIL for minutes inside one big power such as `9^{9^{9^{9}}}`) and a fresh
  child serves the next row. A comparison cut off scores 0.0 (the answer that made it hang earns
  nothing); a gold answer cut off makes its rows None.

This module imports only the standard library: math-verify is imported in the child.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import Any

from grpo_ray.data.prompts import last_boxed
from grpo_ray.reward.functions import FailedScore, _gold, completion_texts, extract_answer

DEFAULT_TIMEOUT_S = 5.0
"""Longest one comparison (gold + answer parsed, then compared) may take (`kwargs.timeout_s`)."""
_START_TIMEOUT_S = 120.0  # a new child imports sympy and math-verify: ~1 s, more on a busy host
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    readable = {g: _VERIFIER.ask({"gold": g}, timeout_s) for g in set(golds) - {None}}
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
        reply = _VERIFIER.ask({"gold": g, "answer": as_latex(predicted)}, timeout_s)
        if reply is not None and "error" in reply:
            out.append(_failed(reply))
            continue
        out.append(2.0 if reply is not None and reply.get("equal") else 0.0)
    return out


def _failed(reply: dict[str, Any]) -> FailedScore:
    """A row math-verify failed on: an error inside it is not a wrong answer, so not a 0."""
    return FailedScore(f"math-verify: {reply['error'][:200]}")


# ---- the child process ---------------------------------------------------------------------------

class _Child:
    """One math-verify process; requests and replies are JSON lines on its stdin / stdout."""

    def __init__(self) -> None:
        env = dict(os.environ, GRPO_RAY_MATH_PARENT=str(os.getpid()),
                   PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH"))
                                              if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from grpo_ray.reward.math import child_main; child_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._buffer = b""
        ready = self._read(_START_TIMEOUT_S)
        if ready != {"ready": True}:
            self.kill()
            raise RuntimeError(f"math: the math-verify process did not start within "
                               f"{_START_TIMEOUT_S:g} s (is math-verify installed? see its "
                               "stderr above)")

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | str:
        """The reply, or "timeout" / "died"."""
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return "died"
        return self._read(timeout_s)

    def _read(self, timeout_s: float) -> dict[str, Any] | str:
        """The next reply line, or "timeout", or "died" (its stdout closed)."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return "timeout"
            chunk = os.read(fd, 65536)
            if not chunk:
                return "died"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class MathVerifier:
    """Child processes shared by the threads of one process, each used by one thread at a time;
    a child that times out or dies is never reused."""

    def __init__(self) -> None:
        self._idle: list[_Child] = []
        self._lock = threading.Lock()

    def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The child's reply to `request` (`{"error": ...}` when math-verify raised, or when a
        fresh child died on it too); None when it took longer than `timeout_s`."""
        for _ in range(2):  # an idle child may have died meanwhile: one retry on a fresh one
            with self._lock:
                child = self._idle.pop() if self._idle else None
            child = child or _Child()
            reply = child.ask(request, timeout_s)
            if isinstance(reply, dict):
                with self._lock:
                    self._idle.append(child)
                return reply
            child.kill()
            if reply == "timeout":
                return None
        return {"error": f"its process died on this row (exit code {child.proc.returncode})"}

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()


_VERIFIER = MathVerifier()
atexit.register(_VERIFIER.close)


def child_main() -> None:
    """The child: reads `{"gold": latex, "answer": latex (optional)}` lines, answers
    `{"gold": readable, "equal": equivalent}` lines, or `{"error": ...}` when math-verify
    raised."""
    _die_with_parent()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the replies
    sys.stdout = sys.stderr
    import logging
    from functools import lru_cache

    for name in ("math_verify", "latex2sympy2_extended"):  # "timeout is disabled": we time out
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]

    @lru_cache(maxsize=4096)
    def read(latex: str) -> Any:
        return parse(latex, extraction_config=config, parsing_timeout=None, raise_on_error=True)

    replies.write(json.dumps({"ready": True}) + "\n")
    for line in iter(sys.stdin.readline, ""):
        try:
            request = json.loads(line)
            gold = read(request["gold"])
            reply: dict[str, Any] = {"gold": bool(gold)}
            if gold and request.get("answer") is not None:
                # raise_on_error: else math-verify logs its own error and answers False
                reply["equal"] = bool(verify(gold, read(request["answer"]),
                                             timeout_seconds=None, raise_on_error=True))
        except Exception as e:  # one bad request must not end the child
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")


def _die_with_parent() -> None:
    """Linux: the kernel kills this child when the process that started it dies, even while it is
    stuck in a computation (a closed stdin ends it only between requests)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if str(os.getppid()) != os.environ.get("GRPO_RAY_MATH_PARENT", str(os.getppid())):
        os._exit(0)  # the parent died before prctl took effect
