"""Rows of question/answer/gold from the hub, a local file or the generator (the prompt iterator
that tokenizes them is `driver.data.prompts`).

A row, as `load_rows` returns it:

    {"question": "What is 1/2 + 1/4?",   # `data.question_field`, or the last user message
     "answer": "... \\boxed{\\frac{3}{4}}",  # `data.answer_field` as text
     "gold": "\\frac{3}{4}",              # taken out of it as `data.gold` says
     "prompt": None,                      # the row's chat messages (TRL's conversational format)
     "columns": {"level": 2}}             # every other column, for reward functions

Evaluation's rows (`load_eval_rows`) never come from the training rows unless asked: a second file
(`data.eval_path`), a seeded share of the training questions held out of them
(`data.eval_fraction`, `split_off`), or a `test`/`validation` split.

Files and the hub are read by `driver.data.files`, which names every record by its line or row; every
problem here is one `DataError` line naming the source, the line or row and the column.
`transformers` is imported inside functions: importing this module stays light.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any, Callable

from grpo_ray.answer_format import gold_answer, last_boxed
from grpo_ray.config import DataConfig
from grpo_ray.driver.data.files import (DataError, Record, kind, read_hub, read_local, read_split,
                                        split_names)
from grpo_ray.driver.data.synthetic import held_out_rows, synthetic_rows

# The held-out synthetic rows come from another stream than the train rows (and skip every
# train question, see held_out_rows); any offset works, 1 keeps it obvious.
_EVAL_SEED_OFFSET = 1
RESERVED_COLUMNS = ("prompt", "prompts", "completions", "completion_ids", "answer", "question")
"""Names reward functions receive from the pool itself, so no dataset column is passed under
them: `answer` is the gold, `question` the question text."""

def _stderr_warning(message: str, _said: set[str] = set()) -> None:
    if message not in _said:  # the same file loaded for training and evaluation warns once
        _said.add(message)
        print(f"data warning: {message}", file=sys.stderr)


DEFAULT_EVAL_SPLITS = ("test", "validation")
"""Splits evaluation reads when none is named, the first the dataset has."""


def load_rows(cfg: DataConfig, split: str | None = None,
              warn: Callable[[str], None] = _stderr_warning) -> list[dict[str, Any]]:
    """Rows (see the module's docstring) of one split.

    `split` defaults to `cfg.split`, the training rows; with `cfg.eval_fraction` they are what
    is left once the held-out rows are taken out (`split_off`). Synthetic data has two splits:
    `cfg.split` (seed `cfg.seed`) and its held-out rows, `cfg.eval_split` or `test` (another seed,
    distinct questions, none of them in the train split). A local file is a single split: asking
    it for another than `cfg.split` is an error rather than a silent evaluation on the training
    rows; a local directory has the splits its file names say. Rows of a file or hub dataset
    that repeat an earlier row's question are counted and `warn`ed about (printed to stderr by
    default); synthetic rows repeat by design (they are drawn independently).
    """
    split = split or cfg.split
    if cfg.source == "synthetic":
        held_out = cfg.eval_split or DEFAULT_EVAL_SPLITS[0]
        if split not in (cfg.split, held_out):
            raise DataError(f"data.source=synthetic has splits {cfg.split!r} and "
                            f"{held_out!r}, not {split!r}")
        train = synthetic_rows(cfg.num_synthetic, cfg.seed, cfg.synthetic_max_value)
        if split == cfg.split:
            raw = train
        else:
            raw = held_out_rows(cfg.num_synthetic, cfg.seed + _EVAL_SEED_OFFSET,
                                cfg.synthetic_max_value, {r["question"] for r in train})
        return _validated([(f"row {i}", r) for i, r in enumerate(raw)],
                          f"data.source=synthetic split {split!r}", cfg)
    rows = _read(cfg, split, warn)
    if split == cfg.split and cfg.eval_fraction:
        rows, _ = split_off(rows, cfg.eval_fraction, cfg.seed)
    return rows


def load_eval_rows(cfg: DataConfig, split: str | None = None,
                   warn: Callable[[str], None] = _stderr_warning
                   ) -> tuple[list[dict[str, Any]], str]:
    """The rows evaluation reads, in file order, and a few words on where they come from.

    `split` (`Config.eval_split`) equal to `cfg.split` evaluates on the training rows (asked
    for). Otherwise: `cfg.eval_path`'s rows; or the rows `cfg.eval_fraction` holds out of the
    training split; or synthetic data's held-out rows; or the named split of a hub dataset or
    a local directory, by default `test`, else `validation`. A single local file with none of
    these has no held-out rows: a `DataError` says how to get some.
    """
    if split == cfg.split:
        return load_rows(cfg, split, warn), f"the training rows (eval.split={split})"
    if cfg.eval_path is not None:
        source = f"data.eval_path={cfg.eval_path}"
        rows = _validated(read_local(cfg.eval_path, source), source, cfg)
        train = {r["question"] for r in load_rows(cfg, warn=warn)}
        shared = sum(r["question"] in train for r in rows)
        if shared:
            warn(f"{source}: {shared} of {len(rows)} rows ask a question of the training rows")
        return rows, source
    if cfg.eval_fraction:
        rows = _read(cfg, cfg.split, warn)
        _, held = split_off(rows, cfg.eval_fraction, cfg.seed)
        return held, (f"{len(held)} of {len(rows)} rows of {_source(cfg, cfg.split)} held out "
                      f"(data.eval_fraction={cfg.eval_fraction:g}, seed {cfg.seed})")
    if cfg.source == "synthetic":
        name = split or cfg.eval_split or DEFAULT_EVAL_SPLITS[0]
        return load_rows(cfg, name, warn), f"synthetic held-out rows (split {name!r})"
    if cfg.source == "local" and not _is_directory(cfg):
        raise DataError(f"data.path={cfg.path} is one split: hold rows out for evaluation with "
                        "data.eval_fraction or data.eval_path, or evaluate on the training rows "
                        f"with eval.split={cfg.split}")
    name, subset = (cfg.name, cfg.subset) if cfg.source == "hub" else (cfg.path, None)
    where = f"data.name={cfg.name}" if cfg.source == "hub" else f"data.path={cfg.path}"
    if split is None:
        try:
            names = split_names(name, subset, where)
        except DataError:  # no listing (an offline cache, say): loading `test` says what fails
            names = [DEFAULT_EVAL_SPLITS[0]]
        split = next((s for s in DEFAULT_EVAL_SPLITS if s in names), None)
        if split is None:
            raise DataError(f"{where} has no {' or '.join(map(repr, DEFAULT_EVAL_SPLITS))} split "
                            f"(splits: {', '.join(names)}): name one with data.eval_split, or "
                            "hold rows out with data.eval_fraction or data.eval_path")
    return load_rows(cfg, split, warn), f"split {split!r} of {where}"


def split_off(rows: list[dict[str, Any]], fraction: float,
              seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, held out), each in the rows' order: `fraction` of the distinct questions (at least
    one), chosen by `random.Random(seed)`, go to the held-out rows with every row that asks them,
    so the two parts share no question."""
    questions = list(dict.fromkeys(r["question"] for r in rows))
    count = max(1, round(fraction * len(questions)))
    if count >= len(questions):
        raise DataError(f"data.eval_fraction={fraction:g} holds out all {len(questions)} "
                        "distinct questions: nothing is left to train on")
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    held = {questions[i] for i in order[:count]}
    return ([r for r in rows if r["question"] not in held],
            [r for r in rows if r["question"] in held])


def _source(cfg: DataConfig, split: str) -> str:
    if cfg.source == "hub":
        return f"data.name={cfg.name} ({cfg.subset}, {split})"
    if not _is_directory(cfg):
        return f"data.path={cfg.path}"
    return f"data.path={cfg.path} ({split})"


def _is_directory(cfg: DataConfig) -> bool:
    """Local data in a directory of split files (else `data.path` is one file)."""
    return cfg.path is not None and Path(cfg.path).is_dir()


def _read(cfg: DataConfig, split: str, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows of one split of hub or local data, checked; repeated questions are `warn`ed about."""
    source = _source(cfg, split)
    if cfg.source == "local":
        if _is_directory(cfg):
            records = read_split(cfg.path, None, split, source)
        elif split != cfg.split:
            raise DataError(f"data.source=local has one split ({cfg.split!r}, the file "
                            f"data.path={cfg.path}), not {split!r}")
        else:
            records = read_local(cfg.path, source)
    elif cfg.source == "hub":
        records = read_hub(cfg, split, source)
    else:
        raise DataError(f"data.source: unknown source {cfg.source!r}")
    rows = _validated(records, source, cfg)
    repeats = len(rows) - len({r["question"] for r in rows})
    if repeats:
        warn(f"{source}: {repeats} of {len(rows)} rows repeat an earlier row's question")
    return rows


# ---- checking ----------------------------------------------------------------------------------

def _validated(records: list[Record], source: str, cfg: DataConfig) -> list[dict[str, Any]]:
    """Check every row, take out its question (or chat messages) and gold answer."""
    if not records:
        raise DataError(f"{source}: no rows")
    names = list(dict.fromkeys(k for _, row in records for k in row))
    qcol = cfg.question_field
    if qcol not in names:
        if "prompt" not in names:
            raise DataError(f"{source}: no {qcol!r} column, nor a 'prompt' column of chat "
                            f"messages (columns: {', '.join(names)})")
        qcol = "prompt"
    if cfg.answer_field not in names:
        raise DataError(f"{source}: no {cfg.answer_field!r} column (columns: "
                        f"{', '.join(names)})")
    out = []
    for where, row in records:
        try:
            out.append(_row(row, qcol, cfg))
        except ValueError as e:
            raise DataError(f"{source} {where}: {e}") from None
    return out


def _row(row: dict[str, Any], qcol: str, cfg: DataConfig) -> dict[str, Any]:
    """The row's question, messages, answer text, gold and other columns; ValueError says what
    is wrong with it."""
    value = row.get(qcol)
    messages = None
    if isinstance(value, list):
        messages = _messages(value, qcol)
        question = [m["content"] for m in messages if m["role"] == "user"][-1]
    else:
        question = _text(qcol, value)
    acol = cfg.answer_field
    answer = row.get(acol)
    if cfg.gold == "field" and isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    answer = _text(acol, answer)
    if cfg.gold == "after-hashes":
        if "####" not in answer:
            raise ValueError(f"column {acol!r} has no '####' marker")
        gold = gold_answer(answer)
        if not gold:
            raise ValueError(f"column {acol!r} has nothing after its '####' marker")
    elif cfg.gold == "boxed":
        boxed = last_boxed(answer)
        if boxed is None:
            raise ValueError(f"column {acol!r} has no \\boxed{{...}}"
                             + (" (its last one is never closed)" if "\\boxed" in answer
                                or "\\fbox" in answer else ""))
        if not boxed:
            raise ValueError(f"column {acol!r} has an empty \\boxed{{}}")
        gold = boxed
    else:
        gold = answer.strip()
    return {"question": question, "answer": answer, "gold": gold, "prompt": messages,
            "columns": {k: v for k, v in row.items() if k not in RESERVED_COLUMNS}}


def _text(column: str, value: Any) -> str:
    if value is None:
        raise ValueError(f"column {column!r} is missing")
    if not isinstance(value, str):
        raise ValueError(f"column {column!r} is not text ({kind(value)})")
    if not value.strip():
        raise ValueError(f"column {column!r} is empty")
    return value


def _messages(value: list[Any], column: str) -> list[dict[str, str]]:
    """TRL's conversational prompt: a list of `{"role", "content"}` with a user message."""
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ValueError(f"column {column!r} message {k} is not {{'role': text, "
                             f"'content': text}} ({kind(m)})")
    if not any(m["role"] == "user" for m in value):
        raise ValueError(f"column {column!r} has no user message (roles: "
                         f"{', '.join(m['role'] for m in value) or 'none'})")
    return [{"role": m["role"], "content": m["content"]} for m in value]
